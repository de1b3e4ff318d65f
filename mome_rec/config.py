"""Typed configuration loaded from YAML, with dotted ``key=value`` overrides.

A config file has four sections, each a dataclass below: ``data``, ``model``,
``train`` and ``distributed``. Unknown keys, wrong types and missing files raise
:class:`~mome_rec.errors.ConfigError` with the file and the dotted key.

Example::

    cfg = load_config("configs/synthetic.yaml", ["train.epochs=2"])
    cfg.train.epochs  # 2
"""

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from mome_rec.errors import ConfigError

_RANGE = re.compile(r"^(?P<head>.*)\{(?P<start>\d+)\.\.(?P<stop>\d+)\}(?P<tail>.*)$")


def expand_columns(names: List[str]) -> List[str]:
    """Expand ``"numerical_{1..3}"`` into ``numerical_1, numerical_2, numerical_3``."""
    expanded = []
    for name in names:
        match = _RANGE.match(name)
        if match is None:
            expanded.append(name)
            continue
        for index in range(int(match["start"]), int(match["stop"]) + 1):
            expanded.append(f"{match['head']}{index}{match['tail']}")
    return expanded


@dataclasses.dataclass
class SchemaConfig:
    """Column roles: sparse ids, dense floats, labels (one per task) and the row id.

    Column lists accept ranges: ``"categorical_{1..16}"``. ``sparse_kind`` is
    ``int`` (non-negative integer ids, checked) or ``string`` (any value).
    """

    sparse: List[str] = dataclasses.field(default_factory=list)
    dense: List[str] = dataclasses.field(default_factory=list)
    labels: List[str] = dataclasses.field(default_factory=list)
    row_id: Optional[str] = None
    sparse_kind: str = "int"

    def __post_init__(self) -> None:
        self.sparse = expand_columns(self.sparse)
        self.dense = expand_columns(self.dense)
        self.labels = expand_columns(self.labels)


@dataclasses.dataclass
class SyntheticConfig:
    """Size and seed of the AliExpress-shaped synthetic data set."""

    train_rows: int = 200_000
    validation_rows: int = 40_000
    test_rows: int = 40_000
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    """Sources of the train, validation and test splits, and how they are read.

    ``source`` is ``synthetic`` (generated, cached as parquet), ``census`` (the
    adult parquet file at ``path``, split by row position) or ``files`` (CSV or
    parquet files or folders in ``train``, ``validation`` and ``test``). Without
    a validation split, every ``round(1 / validation_fraction)``-th training row
    is held out for validation.
    """

    source: str = "synthetic"
    schema: SchemaConfig = dataclasses.field(default_factory=SchemaConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    path: Optional[str] = None
    train: List[str] = dataclasses.field(default_factory=list)
    validation: List[str] = dataclasses.field(default_factory=list)
    test: List[str] = dataclasses.field(default_factory=list)
    validation_fraction: float = 0.1
    cache_dir: Optional[str] = None
    read_batch_rows: int = 65_536
    shuffle_buffer_rows: int = 262_144


@dataclasses.dataclass
class ModelConfig:
    """The ranking model: embeddings, over-arch and towers.

    ``over_arch`` names the network above the embeddings: ``mome`` (neuron and
    expert masks), its ablations ``base``, ``mome_n`` and ``mome_w``, or a
    baseline. ``lambda_neuron`` and ``lambda_expert`` are the L0 weights
    lambda_1 and lambda_2.
    """

    embedding_dim: int = 128
    over_arch: str = "mome"
    hidden_dims: List[int] = dataclasses.field(default_factory=lambda: [512, 256])
    num_experts: int = 8
    tower_dims: List[int] = dataclasses.field(default_factory=lambda: [128, 64])
    dropout: float = 0.2
    batch_norm: bool = True
    sigma: float = 0.5
    mu_init: float = 0.5
    lambda_neuron: float = 1e-4
    lambda_expert: float = 1e-4
    num_shared_experts: Optional[int] = None


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and the two MoME phases.

    ``neuron_epochs`` is M: the first M epochs learn the neuron masks, the rest
    learn the expert masks. ``embedding_optimizer`` is ``adam``, ``adagrad`` or
    ``sgd`` and is applied in backward to the embedding tables. ``mask_lr`` is
    Adam's learning rate for the mask means (``neuron_mask_mu``,
    ``expert_mask_mu``); None means ``lr``. Adam moves a mean by about the
    learning rate per step, so with ``lr`` 1e-3 a mean needs about 500 steps to
    go from its initial 0.5 to 0, which a short run does not take.
    """

    epochs: int = 50
    neuron_epochs: int = 1
    batch_size: int = 2048
    eval_batch_size: int = 8192
    lr: float = 1e-3
    mask_lr: Optional[float] = None
    embedding_optimizer: str = "adam"
    embedding_lr: float = 1e-3
    seed: int = 0
    checkpoint_every_steps: int = 0
    max_steps_per_epoch: Optional[int] = None


@dataclasses.dataclass
class TableConstraintConfig:
    """Planner constraints of one embedding table."""

    sharding_types: List[str] = dataclasses.field(default_factory=list)
    compute_kernels: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DistributedConfig:
    """Sharding of the embedding tables.

    ``tables`` maps a sparse column to planner constraints. ``table_rows`` maps
    every sparse column to its embedding table's rows (vocabulary size + 1),
    so that ``mome-rec plan`` can size the tables without reading the data.
    """

    backend: Optional[str] = None
    tables: Dict[str, TableConstraintConfig] = dataclasses.field(default_factory=dict)
    table_rows: Dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Config:
    """A whole job's configuration."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str, overrides: Optional[List[str]] = None, check_files: bool = True) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides and validate the result.

    Relative data paths are resolved against the config file's folder.
    ``check_files=False`` accepts data paths that do not exist, for commands
    such as ``mome-rec plan`` that do not read the data.
    """
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")

    # Build once from the file and once after each override, so that an unknown key or a wrong type is
    # blamed on the file or on the override that brought it.
    config = _build(Config, raw, path, "")
    for override in overrides or []:
        _apply_override(raw, override, path)
        config = _build(Config, raw, f"override {override!r}", "")
    _resolve_paths(config, config_path.parent)
    _validate(config, path, check_files)
    return config


def config_from_dict(raw: Dict[str, Any], source: str = "<dict>", check_files: bool = True) -> Config:
    """Build and validate a config from a mapping, as :func:`load_config` does for a file.

    ``check_files=False`` accepts data paths that no longer exist, as when a
    checkpoint's config is read on a machine without the training data.
    """
    config = _build(Config, raw, source, "")
    _validate(config, source, check_files)
    return config


def _apply_override(raw: Dict[str, Any], override: str, path: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.epochs=2")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text)


def _build(cls: type, raw: Any, path: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{path}: unknown key {prefix}{key} (known: {known})")
    values = {key: _convert(hints[key], value, path, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, path: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _convert(inner[0], value, path, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, f"{key}.")
    if origin in (list, List):
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key} must be a list, got {value!r}")
        return [_convert(args[0], item, path, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a mapping, got {value!r}")
        return {str(name): _convert(args[1], item, path, f"{key}.{name}") for name, item in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _resolve_paths(config: Config, base: Path) -> None:
    data = config.data

    def resolve(name: Optional[str]) -> Optional[str]:
        if name is None or Path(name).is_absolute():
            return name
        return str((base / name).resolve())

    data.path = resolve(data.path)
    data.train = [resolve(name) for name in data.train]
    data.validation = [resolve(name) for name in data.validation]
    data.test = [resolve(name) for name in data.test]


_SOURCES = ("synthetic", "census", "files")
_EMBEDDING_OPTIMIZERS = ("adam", "adagrad", "sgd")


def _validate(config: Config, path: str, check_files: bool = True) -> None:
    data, model, train = config.data, config.model, config.train
    if data.source not in _SOURCES:
        raise ConfigError(f"{path}: data.source must be one of {', '.join(_SOURCES)}, got {data.source!r}")
    if data.schema.sparse_kind not in ("int", "string"):
        raise ConfigError(f"{path}: data.schema.sparse_kind must be int or string, got {data.schema.sparse_kind!r}")
    if data.source == "census":
        if data.path is None:
            raise ConfigError(f"{path}: data.path is required for the census source")
        if check_files and not Path(data.path).is_file():
            raise ConfigError(f"{path}: data.path {data.path} not found")
    if data.source == "files":
        for split in ("train", "test"):
            if not getattr(data, split):
                raise ConfigError(f"{path}: data.{split} is required for the files source")
        for split in ("train", "validation", "test"):
            for name in getattr(data, split) if check_files else []:
                if not Path(name).exists():
                    raise ConfigError(f"{path}: data.{split} path {name} not found")
    if data.source != "synthetic" and not data.schema.labels:
        raise ConfigError(f"{path}: data.schema.labels must name at least one label column")
    if not 0.0 < data.validation_fraction < 1.0:
        raise ConfigError(f"{path}: data.validation_fraction must be in (0, 1), got {data.validation_fraction}")

    positive = {
        "model.embedding_dim": model.embedding_dim,
        "model.num_experts": model.num_experts,
        "model.sigma": model.sigma,
        "train.epochs": train.epochs,
        "train.batch_size": train.batch_size,
        "train.eval_batch_size": train.eval_batch_size,
        "train.lr": train.lr,
        "train.embedding_lr": train.embedding_lr,
        "train.mask_lr": train.lr if train.mask_lr is None else train.mask_lr,
        "data.read_batch_rows": data.read_batch_rows,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{path}: {key} must be positive, got {value}")
    if not model.hidden_dims or any(width <= 0 for width in model.hidden_dims):
        raise ConfigError(f"{path}: model.hidden_dims must be a non-empty list of positive widths")
    if any(width <= 0 for width in model.tower_dims):
        raise ConfigError(f"{path}: model.tower_dims must hold positive widths")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"{path}: model.dropout must be in [0, 1), got {model.dropout}")
    if model.lambda_neuron < 0 or model.lambda_expert < 0:
        raise ConfigError(f"{path}: model.lambda_neuron and model.lambda_expert must be >= 0")
    if not 0 <= train.neuron_epochs <= train.epochs:
        raise ConfigError(f"{path}: train.neuron_epochs must be between 0 and train.epochs ({train.epochs})")
    if train.embedding_optimizer not in _EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"{path}: train.embedding_optimizer must be one of {', '.join(_EMBEDDING_OPTIMIZERS)}, "
            f"got {train.embedding_optimizer!r}"
        )
    if config.distributed.backend not in (None, "gloo", "nccl"):
        raise ConfigError(f"{path}: distributed.backend must be gloo or nccl, got {config.distributed.backend!r}")
