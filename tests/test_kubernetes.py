"""kubernetes/rayjob.yaml: a KubeRay RayJob for this Ray, whose entrypoint blendtune accepts as it stands.
Fast: reads the YAML and runs blendtune's own argument parsing and config checks; no cluster, no Ray."""
import copy
import shlex
from pathlib import PurePosixPath

import pytest
import ray
import yaml

from blendtune.cli import _parser
from blendtune.comparisons import strategy_variants
from blendtune.config import load_config, with_overrides
from blendtune.errors import UserError
from blendtune.search_space import check_sweep, load_search_space
from conftest import REPO

MANIFEST = REPO / "kubernetes" / "rayjob.yaml"
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def pod_specs(job: dict) -> dict[str, dict]:
    """{'head': pod spec, 'worker <group>': pod spec, ...}"""
    cluster = job["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs") or []:
        specs[f"worker {group['groupName']}"] = group["template"]["spec"]
    return specs


def containers(job: dict) -> list[tuple[str, dict]]:
    return [(f"{where}/{c['name']}", c) for where, spec in pod_specs(job).items() for c in spec["containers"]]


def check_manifest(job: dict) -> None:
    """The KubeRay side: kind, versions, where trials run, where the credentials come from."""
    assert job.get("apiVersion") == "ray.io/v1", f"apiVersion: expected ray.io/v1, got {job.get('apiVersion')!r}"
    assert job.get("kind") == "RayJob", f"kind: expected RayJob, got {job.get('kind')!r}"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, \
        f"rayClusterSpec.rayVersion {cluster['rayVersion']!r} is not the installed Ray {ray.__version__}"
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", \
        f"head rayStartParams num-cpus: expected the string \"0\" (no trials on the head), got {head_params.get('num-cpus')!r}"
    gpu_groups = [g["groupName"] for g in cluster.get("workerGroupSpecs") or []
                  for c in g["template"]["spec"]["containers"]
                  if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit: GPU trials would wait forever"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group["groupName"]
    for where, container in containers(job):
        tag = container["image"].rpartition(":")[2]
        assert tag == ray.__version__ or tag.startswith(ray.__version__ + "-"), \
            f"{where}: image {container['image']!r} is not Ray {ray.__version__}"
        env = {e["name"]: e for e in container.get("env") or []}
        for name in SECRET_VARS:
            assert name in env, f"{where}: {name} not set (head and workers both write to S3)"
            assert "value" not in env[name] and "secretKeyRef" in env[name].get("valueFrom", {}), \
                f"{where}: {name} must come from a Secret (valueFrom.secretKeyRef), not a literal value"
        assert "BLENDTUNE_DATA_ROOT" in env, f"{where}: BLENDTUNE_DATA_ROOT not set"
        assert under_a_mount(container, env["BLENDTUNE_DATA_ROOT"]["value"]), \
            f"{where}: BLENDTUNE_DATA_ROOT {env['BLENDTUNE_DATA_ROOT']['value']} is on no volume of the container"


def under_a_mount(container: dict, path: str) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in container.get("volumeMounts") or [])


def check_entrypoint(job: dict):
    """The entrypoint as `blendtune.cli.main` reads it, then the checks `blendtune sweep` / `compare` make
    before Ray starts. Relative paths are the repository's (the runtime env's working_dir)."""
    entrypoint = job["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:2] in (["blendtune", "sweep"], ["blendtune", "compare"]), \
        f"entrypoint: expected `blendtune sweep ...` or `blendtune compare ...`, got {entrypoint!r}"
    parser = _parser()
    args, extra = parser.parse_known_args(argv[1:])  # as main(): key=value after --options land in `extra`
    unknown = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    assert not unknown, f"entrypoint: unrecognized arguments: {' '.join(unknown)}"
    overrides = list(args.overrides) + extra
    assert not args.resume and args.experiment, "entrypoint: a new sweep needs an experiment YAML (no --resume)"
    if not PurePosixPath(args.experiment).is_absolute():
        assert "working_dir" in yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}"), \
            f"entrypoint: {args.experiment} is relative, but runtimeEnvYAML has no working_dir"
    try:
        cfg = load_config(REPO / args.experiment, overrides)
        if args.command == "sweep":
            assert args.space, "entrypoint: blendtune sweep needs --space SPACE.yaml"
            check_sweep(cfg, load_search_space(REPO / args.space), None, args.space)
        else:
            for variant in strategy_variants(args.strategies):
                with_overrides(cfg, variant)
    except UserError as e:
        raise AssertionError(f"entrypoint: blendtune would refuse it: {e}") from None
    assert (cfg.sweep.storage_path or "").startswith("s3://"), \
        f"entrypoint: sweep.storage_path={cfg.sweep.storage_path!r}: trials must go to S3 (s3://...)"
    assert cfg.train.device.startswith("cuda"), \
        f"entrypoint: train.device={cfg.train.device!r}: the head has no GPU, so 'auto' would ask Ray for none"
    head = pod_specs(job)["head"]["containers"][0]
    assert PurePosixPath(cfg.output_dir).is_absolute() and under_a_mount(head, cfg.output_dir), \
        f"entrypoint: output_dir={cfg.output_dir!r} is on no volume of the head: --resume needs the sweep dir " \
        "after the cluster is gone"
    return cfg


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load(MANIFEST.read_text())


def test_the_manifest_is_a_rayjob_for_this_ray_with_gpu_workers_and_s3_credentials_from_a_secret(job):
    check_manifest(job)


def test_the_entrypoint_is_a_sweep_blendtune_accepts_with_s3_storage(job):
    cfg = check_entrypoint(job)
    assert cfg.sweep.gpus_per_trial is not None and cfg.sweep.num_samples > 1


def test_the_checks_catch_a_wrong_key_and_a_wrong_api_version(job):
    """The checks above can fail: a typo in a config key, a KubeRay apiVersion of old."""
    broken = copy.deepcopy(job)
    broken["spec"]["entrypoint"] = job["spec"]["entrypoint"] + " sweep.num_sample=16"
    with pytest.raises(AssertionError, match="unknown config key 'sweep.num_sample'"):
        check_entrypoint(broken)
    broken = copy.deepcopy(job)
    broken["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(AssertionError, match="apiVersion"):
        check_manifest(broken)
    broken = copy.deepcopy(job)
    env = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env[:] = [{"name": e["name"], "value": "AKIA..."} if e["name"] == "AWS_ACCESS_KEY_ID" else e for e in env]
    with pytest.raises(AssertionError, match="secretKeyRef"):
        check_manifest(broken)
