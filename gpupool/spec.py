"""The experiment file: what to run, where it may run, how to checkpoint, and its limits.

Shaped after SkyPilot's task YAML::

    name: mnist-mlp
    workdir: .                  # shipped to every session as a bundle
    setup: pip install -r requirements.txt
    run: python train.py
    resources: {gpu: any}       # any | none | T4 | ... ; gpu_memory_gb: 12
    providers: [colab, kaggle, local]
    checkpoint: {interval: 10m, keep_last: 3}
    limits: {max_hops: 20, retries_on_error: 2, gpu_hours: 40}
    env: {EPOCHS: "20"}
    inputs:                     # data; each at $GPUPOOL_INPUT_<NAME> in the session
      train: {local: data/train}            # uploaded once per content, used in place locally
      corpus: {kaggle: alice/corpus@3}      # an existing Kaggle dataset, attached (no transfer)
      vocab: {url: "https://example.org/vocab.txt", sha256: "<64 hex>"}
      shards: {drive: "<Drive file or folder id>"}
"""

from __future__ import annotations

import json
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpupool.durations import parse_duration
from gpupool.errors import SpecError, StoredSpecError
from gpupool.session.snapshot import RESUME, normalise, resume_problems
from gpupool.yamlfile import compose, did_you_mean, load_yaml_model, locate, locate_in

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,48}[a-z0-9]$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    gpu: str = Field("any", description="any, none, or a kind such as T4, P100, A100, L4")
    gpu_memory_gb: float | None = Field(None, gt=0)

    @field_validator("gpu")
    @classmethod
    def _gpu_kind(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", value):
            raise ValueError("must be any, none, or a GPU kind such as T4")
        return value

    @property
    def wants_gpu(self) -> bool:
        return self.gpu.lower() != "none"


def _folder(value: Any) -> str:
    """A folder named in the experiment file: relative to the workdir and inside it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a folder relative to the workdir, e.g. checkpoints")
    if value.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{value!r} is absolute; name a folder relative to the workdir")
    folder = normalise(value)
    if folder == ".":
        raise ValueError(f"{value!r} is the workdir itself, which is shipped as code; name a sub-folder")
    if folder == ".." or folder.startswith("../"):
        raise ValueError(f"{value!r} is outside the workdir; name a folder inside it")
    return folder


class CheckpointPolicy(_Strict):
    interval: float | Literal["auto"] = Field(600.0, description="seconds between checkpoints")
    keep_last: int = Field(3, ge=1, le=1000)
    min_interval: float = 60.0
    max_interval: float = 3600.0
    path: str | None = Field(None, description="the folder (relative to the workdir) where the "
                             "script writes its own checkpoints: restored and snapshotted")
    settle: float = Field(1.0, description="seconds the folder must be unchanged before a "
                          "snapshot (a checkpoint still being written is never published)")

    @field_validator("settle", mode="before")
    @classmethod
    def _settle(cls, value: Any) -> Any:
        seconds = parse_duration(value)
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return None if value is None else _folder(value)

    @field_validator("interval", "min_interval", "max_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value == "auto":
            return value
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be longer than zero")
        return seconds

    @model_validator(mode="after")
    def _bounds(self) -> CheckpointPolicy:
        if self.min_interval > self.max_interval:
            raise ValueError("min_interval must not be longer than max_interval")
        return self


class Limits(_Strict):
    max_hops: int = Field(50, ge=0, description="sessions after the first one")
    retries_on_error: int = Field(
        2, ge=0, description="sessions that may fail with an error in a row without a new checkpoint")
    max_sessions_without_checkpoint: int = Field(
        3, ge=1, description="stop after this many sessions in a row publish no new checkpoint")
    gpu_hours: float | None = Field(None, gt=0, description="budget summed over attempts")


INPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
KAGGLE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9_-]{2,49}(@[1-9][0-9]*)?$")
INPUT_KINDS = ("local", "kaggle", "drive", "url")
LOOPBACK_HTTP = r"http://(127\.0\.0\.1|localhost)(:[0-9]+)?/\S*"  # a local mirror, tests


def _input_name(name: str) -> str:
    if not INPUT_NAME.fullmatch(name):
        raise ValueError("not a valid input name (letters, digits, _; not starting with a digit; "
                         "it names GPUPOOL_INPUT_<NAME>)")
    return name


class InputSpec(_Strict):
    """One named input: exactly one source, after SkyPilot's ``file_mounts`` (see gpupool.inputs
    for where it appears in a session). A bare string is a local path."""

    local: Path | None = Field(None, description="file or folder, relative to the experiment file")
    kaggle: str | None = Field(None, description="an existing dataset: owner/slug[@version]")
    drive: str | None = Field(None, description="a Drive file or folder id, or a path in My Drive")
    url: str | None = Field(None, description="https:// address fetched in the session")
    sha256: str | None = Field(None, description="the url's expected content hash (64 hex digits)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:  # `name:` with nothing after it (pydantic would say "instance of")
            raise ValueError("needs a source: a local path, or {local|kaggle|drive|url: ...}")
        if isinstance(value, (str, Path)):
            return {"local": value}
        if not isinstance(value, dict):
            raise ValueError(f"must be a local path or {{local|kaggle|drive|url: ...}}, not {value!r}")
        return value

    @field_validator("local", "kaggle", "drive", "url", mode="before")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        # "" would silently mean the experiment file's folder (local) or an id Drive never has
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give the source, or remove the input")
        if value is not None and not isinstance(value, (str, Path)):
            raise ValueError(f"must be text (a path, dataset, id or address), not {value!r}")
        return value

    @field_validator("local")
    @classmethod
    def _local(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()  # `~/data` means the home folder, as in a shell
        base = (info.context or {}).get("base_dir")
        return (Path(base) / value).resolve() if base is not None else value

    @field_validator("kaggle")
    @classmethod
    def _kaggle(cls, value: str | None) -> str | None:
        if value is not None and not KAGGLE_REF.fullmatch(value):
            raise ValueError("must be a Kaggle dataset as owner/slug or owner/slug@version")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(LOOPBACK_HTTP + r"|https://[^\s/]+/\S*", value):
            raise ValueError("must be an https:// address (http:// only on this machine)")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal digits (a sha256)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        given = [kind for kind in INPUT_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError("needs exactly one source: local, kaggle, drive or url "
                             f"(given: {', '.join(given) or 'none'})")
        if self.sha256 is not None and self.url is None:
            raise ValueError("sha256 applies to url inputs only (other kinds are hashed by gpupool)")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in INPUT_KINDS if getattr(self, kind) is not None)

    @property
    def source(self) -> str:
        return str(getattr(self, self.kind))


class ExperimentSpec(_Strict):
    name: str
    workdir: Path = Path(".")
    setup: str | None = None
    run: str
    resources: Resources = Resources()
    providers: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    accounts: dict[str, list[str]] = Field(
        default_factory=dict, description="per provider, the only members' accounts it may use "
        "(e.g. {kaggle: [alice]}); a provider not named here may use any of the pool's")
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    limits: Limits = Limits()
    env: dict[str, str] = Field(default_factory=dict)
    # each entry is checked on its own, so every bad one is reported with its index and line
    outputs: list[Annotated[str, BeforeValidator(_folder)]] = Field(
        default_factory=list, description="folders collected from every session")
    # names are checked one by one, so each bad name is reported at its own line
    inputs: dict[Annotated[str, AfterValidator(_input_name)], InputSpec] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "must be 3-50 characters of lowercase letters, digits and '-', "
                "starting and ending with a letter or digit (it names Kaggle kernels and files)"
            )
        return value

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be the command that starts training, e.g. python train.py")
        return value

    @field_validator("providers")
    @classmethod
    def _providers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a provider twice")
        for name in value:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"{name!r} is not a provider name (e.g. colab, kaggle, local)")
        return value

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("outputs")
    @classmethod
    def _outputs_once(cls, folders: list[str]) -> list[str]:
        repeated = sorted({f for f in folders if folders.count(f) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} twice")
        return folders

    def state_folders(self) -> list[str]:
        """The checkpoint and output folders: the run's state, never shipped as code."""
        return ([self.checkpoint.path] if self.checkpoint.path else []) + list(self.outputs)

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        listed = info.data.get("providers") or []
        for provider, names in value.items():
            if provider not in listed:
                raise ValueError(f"{provider!r} is not in providers ({', '.join(listed)})")
            if not names:
                raise ValueError(f"{provider}: name at least one account, or leave it out")
            if len(set(names)) != len(names):
                raise ValueError(f"{provider}: lists an account twice")
        return value

    def allows_account(self, provider: str, account: str) -> bool:
        """Whether attempts may run on ``provider``'s ``account`` (``accounts`` limits it)."""
        return account in self.accounts.get(provider, [account])

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        if isinstance(value, dict):
            bad = [k for k in value if not ENV_KEY.fullmatch(str(k))]
            if bad:
                raise ValueError(f"not valid environment variable names: {', '.join(map(str, bad))}")
            if any(str(k).startswith("GPUPOOL_") for k in value):
                raise ValueError("GPUPOOL_* variables are set by gpupool itself")
            nested = [str(k) for k, v in value.items() if not isinstance(v, (str, int, float, bool))]
            if nested:
                raise ValueError(f"values must be strings or numbers: {', '.join(nested)}")
            return {str(k): str(v) for k, v in value.items()}
        return value

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict):  # `inputs:` left empty, or given as a list
            raise ValueError("must map input names to sources, e.g. `train: data/train` on "
                             "the next line, indented (or remove inputs:)")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return (Path(base) / value).resolve() if base is not None else value


@lru_cache(maxsize=256)
def parse_stored(stored: str, experiment_id: str) -> ExperimentSpec:
    """An experiment's spec as the state database stores it (``stored``, JSON), validated;
    cached, so the scheduler's many reads of one experiment validate it once per process (the
    model is frozen: one copy is shared). Raises ``StoredSpecError`` naming each bad field
    when this gpupool cannot read it (written by an older or newer version): pydantic's
    ``ValidationError`` stops here."""
    try:
        return ExperimentSpec.model_validate(json.loads(stored))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}"
                             for e in err.errors())
        raise StoredSpecError(
            f"experiment {experiment_id}: its stored experiment file no longer validates "
            f"({problems}); resubmit it with `gpupool run`") from None


def load_experiment(path: str | Path, *, check_workdir: bool = True) -> ExperimentSpec:
    """Read and validate an experiment file; relative ``workdir`` is taken from the file's folder.

    Raises ``SpecError`` (exit 2) with each problem's key, line and, for a misspelt key or
    provider, the closest known one; also for a missing workdir, or checkpoint/output folders
    that overlap, leave the workdir or hold shipped code."""
    path = Path(path)
    try:
        spec = load_yaml_model(path, ExperimentSpec, context={"base_dir": path.parent.resolve()})
    except SpecError as err:
        if check_workdir:
            err = SpecError(err.source, err.problems + _inputs_problems_alone(path))
        raise err from None
    _check_provider_names(path, spec.providers)
    text = path.read_text(encoding="utf-8")
    if check_workdir and not spec.workdir.is_dir():
        raise SpecError(str(path), [(locate(text, ("workdir",)), f"{spec.workdir} is not a directory")])
    problems = [(locate(text, loc), why) for loc, why in folder_problems(spec, check_workdir)]
    if check_workdir:
        from gpupool.inputs import input_problems

        problems += [(locate(text, loc), why) for loc, why in input_problems(spec)]
    if problems:
        raise SpecError(str(path), problems)
    return spec


def _inputs_problems_alone(path: Path) -> list[tuple[str, str]]:
    """Problems of the inputs that are valid on their own (a missing or unreadable local path)
    when the file as a whole did not validate, so one run reports every bad input."""
    from gpupool.inputs import local_problems

    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # reported by the load already
        return []
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, dict):
        return []
    context = {"base_dir": path.parent.resolve()}
    problems: list[tuple[str, str]] = []
    for name, raw in inputs.items():
        try:
            item = InputSpec.model_validate(raw, context=context)
        except ValidationError:
            continue  # already reported by the whole file's validation
        problems += [(locate(text, loc), why) for loc, why in local_problems(str(name), item)]
    return problems


def _check_provider_names(path: Path, names: list[str]) -> None:
    """Every name in ``providers:`` must be an installed provider (found by entry point)."""
    from gpupool.provider import available_providers

    installed = sorted(available_providers())
    unknown = [(i, name) for i, name in enumerate(names) if name not in installed]
    if not unknown:
        return
    root = compose(path.read_text(encoding="utf-8"))
    problems = [(locate_in(root, ("providers", i)),
                 f"unknown provider {name!r}" + (did_you_mean(name, installed)
                                                 or f" (installed: {', '.join(installed) or 'none'})"))
                for i, name in unknown]
    raise SpecError(str(path), problems)


def _declared(spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
    named: list[tuple[tuple[Any, ...], str]] = []
    if spec.checkpoint.path:
        named.append((("checkpoint", "path"), spec.checkpoint.path))
    named.extend((("outputs", i), folder) for i, folder in enumerate(spec.outputs))
    return named


def folder_problems(spec: ExperimentSpec, on_disk: bool = True) -> list[tuple[tuple[Any, ...], str]]:
    """What is wrong with the declared folders and the ``{{resume: ...}}`` in ``run``, as
    (field path, message); ``on_disk`` also checks them against the workdir's files."""
    problems = [(("run",), why) for why in resume_problems(spec.run, spec.checkpoint.path)]
    named = _declared(spec)
    for i, (loc, folder) in enumerate(named):
        for other_loc, other in named[:i]:
            if folder == other or folder.startswith(other + "/") or other.startswith(folder + "/"):
                how = "the same folder as" if folder == other else "nested with"
                where = ".".join(map(str, other_loc))
                problems.append((loc, f"{folder!r} is {how} {where} ({other!r}); name each folder once"))
    if on_disk:
        problems.extend((loc, why) for loc, folder in named for why in _on_disk(spec, folder))
    return problems


def _on_disk(spec: ExperimentSpec, folder: str) -> list[str]:
    workdir = spec.workdir.resolve()
    real = (workdir / folder).resolve()
    if real != workdir and workdir not in real.parents:
        return [f"{folder!r} leads outside the workdir (to {real}) through a symlink"]
    if real == workdir:
        return [f"{folder!r} is the workdir itself, which is shipped as code"]
    for command in filter(None, (spec.run, spec.setup)):
        for word in _code_words(RESUME.sub("", command)):
            candidate = (workdir / word).resolve()
            if candidate.is_file() and real in candidate.parents:
                return [f"{folder!r} holds {word}, which the command runs; checkpoint and output "
                        "folders are not shipped as code, so keep code out of them"]
    return []


def _code_words(command: str) -> list[str]:
    """The scripts and modules a command names (``train.py``, ``-m pkg.train``)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    code = [w for w in words if w.endswith((".py", ".sh", ".bash"))]
    for flag, module in zip(words, words[1:], strict=False):
        if flag == "-m":
            base = module.replace(".", "/")
            code += [base + ".py", base + "/__init__.py", base + "/__main__.py"]
    return code
