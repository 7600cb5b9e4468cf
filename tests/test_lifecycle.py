"""The MLflow lifecycle: log -> register -> alias -> load by `models:/name@alias` -> predict, and load-time errors."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import mlflow
import pytest
import transformers
import yaml
from mlflow import MlflowClient

import lorax_mlflow
from lorax_mlflow.packaging import pip_requirements
from tests.helpers import build_tiny_model
from tests.mlflow_support import TINY_ENGINE, throwaway_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory):
    """A throwaway sqlite tracking store with its artifacts in the same temp folder."""
    with throwaway_experiment(tmp_path_factory.mktemp("tracking"), "lifecycle") as experiment:
        yield experiment


def engine_threads() -> int:
    return sum(thread.name == "lorax-engine" for thread in threading.enumerate())


@pytest.fixture(scope="module")
def logged(experiment_id, tiny_model_dir, tiny_adapters):
    """Log and register the model once, counting base-model loads and engine threads around it."""
    loads = []
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real_from_pretrained(cls, *args, **kwargs)

    threads_before = engine_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting_from_pretrained))
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = lorax_mlflow.log_model(
                name="model",
                registered_model_name="support-bot",
                base_model=str(tiny_model_dir),
                adapters={"support": tiny_adapters["a"], "sales": tiny_adapters["b"]},
                engine_config=TINY_ENGINE,
            )
    MlflowClient().set_registered_model_alias("support-bot", "prod", info.registered_model_version)
    return {"info": info, "run_id": run.info.run_id, "loads": loads,
            "engine_threads_left": engine_threads() - threads_before}


@pytest.fixture(scope="module")
def prod_model(logged):
    return mlflow.pyfunc.load_model("models:/support-bot@prod")


@pytest.fixture(scope="module")
def prod_files(logged) -> Path:
    return Path(mlflow.artifacts.download_artifacts("models:/support-bot@prod"))


def chat(content: str, adapter_id: str = "") -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            "custom_inputs": {"adapter_id": adapter_id, "ignore_eos": True}}


def test_the_alias_points_at_the_version_logged_by_the_run(logged):
    version = MlflowClient().get_model_version_by_alias("support-bot", "prod")
    assert str(version.version) == str(logged["info"].registered_model_version)
    assert version.run_id == logged["run_id"]


def test_the_model_loaded_by_alias_answers_with_each_packaged_adapter(prod_model, tiny_model_dir):
    answers = {}
    for adapter in ("support", "sales", ""):
        response = prod_model.predict(chat("Tell me a story", adapter))
        assert response["model"] == (adapter or tiny_model_dir.name)
        assert response["usage"]["completion_tokens"] == 12
        answers[adapter] = response["choices"][0]["message"]["content"]
    assert len(set(answers.values())) == 3, f"adapters must change the greedy answer: {answers}"


def test_logging_loads_the_base_model_once_and_leaves_no_engine_running(logged, tiny_model_dir):
    assert [str(path) for path in logged["loads"]] == [str(tiny_model_dir)]
    assert logged["engine_threads_left"] == 0


def test_the_logged_model_is_code_not_a_pickle(prod_files):
    pyfunc = yaml.safe_load((prod_files / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("model_code.py")
    assert (prod_files / Path(pyfunc["model_code_path"]).name).read_text().count("mlflow.models.set_model(") == 1
    assert "python_model" not in pyfunc
    assert not [p for p in prod_files.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert sorted(p.name for p in (prod_files / pyfunc["code"]).iterdir()) == ["lorax_kernels", "lorax_mlflow"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_requirements_are_explicit_public_pins_of_every_runtime_dependency(prod_files):
    lines = (prod_files / "requirements.txt").read_text().split()
    assert lines == pip_requirements()
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"\d+(\.\d+)*((a|b|rc|\.post|\.dev)\d+)*", v) for v in pins.values()), pins
    assert pins["torch"] == "2.13.0" and pins["mlflow"] == mlflow.__version__
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared_names = {_normalized(re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0]) for spec in declared}
    assert {_normalized(name) for name in pins} == declared_names


@pytest.fixture(scope="module")
def saved_with_own_base(tmp_path_factory, tiny_model_dir, tiny_adapters) -> Path:
    """A model saved against its own copy of the tiny base, so each case can break a copy of it."""
    root = tmp_path_factory.mktemp("own-base")
    base = shutil.copytree(tiny_model_dir, root / "base")
    lorax_mlflow.save_model(root / "model", base_model=str(base), adapters={"support": tiny_adapters["a"]},
                            engine_config=TINY_ENGINE)
    return root / "model"


def _copy_with_config(model: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(model, target)
    mlmodel = yaml.safe_load((target / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"].update(config_changes)
    (target / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return target


def test_a_missing_base_model_folder_fails_at_load(saved_with_own_base, tmp_path):
    missing = tmp_path / "moved-away"
    model = _copy_with_config(saved_with_own_base, tmp_path / "model", base_model=str(missing))
    with pytest.raises(Exception, match=f"base model {re.escape(repr(str(missing)))}.*neither an existing folder"):
        mlflow.pyfunc.load_model(str(model))


def test_a_base_model_the_adapters_do_not_fit_fails_at_load(saved_with_own_base, tmp_path):
    other_base = build_tiny_model(tmp_path / "wider-base", hidden_size=96, intermediate_size=192)
    model = _copy_with_config(saved_with_own_base, tmp_path / "model", base_model=str(other_base))
    with pytest.raises(Exception, match="packaged adapter failed validation") as raised:
        mlflow.pyfunc.load_model(str(model))
    assert "support" in str(raised.value)


def test_a_model_logged_by_a_newer_package_version_fails_at_load(saved_with_own_base, tmp_path):
    model = _copy_with_config(saved_with_own_base, tmp_path / "model", lorax_mlflow_version="99.0.0")
    with pytest.raises(Exception, match=r"logged with lorax-mlflow 99\.0\.0, newer than the installed"):
        mlflow.pyfunc.load_model(str(model))


# ----- MLproject and conda.yaml ------------------------------------------------------------------


def _requirement_name(spec: str) -> str:
    return _normalized(re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0])


def test_conda_env_is_the_pyproject_environment_with_torch_pinned_as_in_the_constraints():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    (pip,) = [entry["pip"] for entry in conda["dependencies"] if isinstance(entry, dict)]
    assert "-e ." in pip
    listed = {_requirement_name(spec): spec for spec in pip if spec != "-e ."}
    for spec in project["dependencies"]:
        assert _requirement_name(spec) in listed, f"{spec} missing from conda.yaml"
    assert listed["torch"] == (REPO / "constraints.txt").read_text().strip()
    for name, spec in listed.items():
        declared = [s for s in project["dependencies"] if _requirement_name(s) == name]
        dev = {_requirement_name(s) for s in project["optional-dependencies"]["dev"]}
        assert name == "torch" or declared == [spec] or (not declared and name in dev), spec


def test_the_serve_and_bench_entry_points_run_real_commands(tmp_path):
    from mlflow.projects._project_spec import load_project

    from lorax_mlflow.cli import build_parser

    project = load_project(str(REPO))
    serve = project.get_entry_point("serve").compute_command({"port": "8123"}, str(tmp_path))
    program, *argv = shlex.split(serve)
    args = build_parser().parse_args(argv)
    assert program == "lorax-mlflow"
    assert (args.command, args.model_uri, args.host, args.port) == ("serve", "models:/lorax-chat@prod", "127.0.0.1", 8123)

    bench = shlex.split(project.get_entry_point("bench").compute_command({}, str(tmp_path)))
    assert bench[:2] == ["python", "-m"] and (REPO / (bench[2].replace(".", "/") + ".py")).exists()


@pytest.mark.slow
def test_mlflow_run_log_model_registers_the_model_and_sets_the_alias(tmp_path, tiny_model_dir, tiny_adapters):
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    adapters = f"support={tiny_adapters['a']},sales={tiny_adapters['b']}"
    subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "log_model", "--env-manager", "local",
         "-P", f"base_model={tiny_model_dir}", "-P", f"adapters={adapters}",
         "-P", "registered_model_name=project-bot", "-P", "alias=staging"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, check=True, capture_output=True, timeout=300,
    )
    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version_by_alias("project-bot", "staging")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["registered_model_name"] == "project-bot" and run.data.params["adapters"] == adapters
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        response = mlflow.pyfunc.load_model("models:/project-bot@staging").predict(chat("hi", "sales"))
    finally:
        mlflow.set_tracking_uri(previous)
    assert response["model"] == "sales" and response["usage"]["completion_tokens"] == 12
