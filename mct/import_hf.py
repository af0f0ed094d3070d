"""Imports a Hugging Face Llama- or MiniCPM-layout safetensors checkpoint as an mct workdir that mct.train
continues from (step 0, fresh optimizer state, fresh data iterator).

    python -m mct.import_hf --hf_dir DIR --out WORKDIR [--unfold_mup] [--config experiments/configs/x.py]

The model shape comes from config.json; everything else (optimizer, schedule, data) from --config (default:
experiments/configs/base.py), whose optimizer the saved state is built for. A Llama layout reads as a
scale-free model unless --unfold_mup restores the muP scales recorded at export. Exporting the result again in
the same layout reproduces the input files bit for bit. A ternary export (mct.export --format ternary) reads
back as its dequantised weights, a model with model.quant.weights = "none" (docs/bitcpm.md).
"""

import collections
import json
import pathlib
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from safetensors import safe_open

from data_pipelines.shards import TOKENIZER
from data_pipelines.tokenizer import read_tokenizer_file
from mct import cli, hf_layout, quant
from mct.checkpoint import Checkpointer, run_meta
from mct.config import Config, ModelConfig, to_dict
from mct.export import INDEX_FILE, fresh_directory
from mct.model import ParamsModel
from mct.optimizer import make_optimizer
from mct.run_reader import RunCheckpoint

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters save; recomputed from the config


class SafetensorsDir:
    """An HF directory's tensors (model.safetensors, or the shards its index names), read one at a time."""

    def __init__(self, hf_dir: pathlib.Path):
        self.hf_dir = hf_dir
        index = hf_dir / INDEX_FILE
        if index.is_file():
            try:
                self.files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index with a 'weight_map': {e}") from None
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(hf_dir / "model.safetensors", "np") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor {INDEX_FILE}")

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name`, checked to have `shape`."""
        if name not in self.files:
            raise ValueError(f"{self.hf_dir}: the checkpoint lacks the tensor {name!r}")
        path = self.hf_dir / self.files[name]
        with safe_open(path, "np") as f:
            tensor = f.get_tensor(name)
        if tensor.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tensor.shape}, config.json implies {shape}")
        return tensor


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    path = hf_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def import_params(hf_dir: pathlib.Path, model_cfg: ModelConfig, layout: str, group_size: int = 0) -> dict:
    """The checkpoint's params dict (fp32), tensor by tensor, undoing the layout's orientation and scales;
    group_size > 0: a ternary export, whose hidden matrices read back as their dequantised weights."""
    weights = SafetensorsDir(hf_dir)
    plan = hf_layout.tensor_plan(model_cfg, layout)
    ternary = {s.name for s in plan if s.param in quant.QUANTISED} if group_size else set()
    expected = {s.name for s in plan} | {name + quant.SCALE_SUFFIX for name in ternary}
    unexpected = set(weights.files) - expected - {"lm_head.weight"}
    unexpected = sorted(n for n in unexpected if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{hf_dir}: tensors this model has no place for (biases? another architecture?): "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")  # fmt: skip
    shapes = {name: x.shape for name, x in ParamsModel(model_cfg).abstract().items()}
    params = {name: np.empty(shape, np.float32) for name, shape in shapes.items()}

    def read(spec: hf_layout.TensorSpec) -> np.ndarray:
        if spec.name not in ternary:
            return weights.read(spec.name, spec.shape)
        n_out, n_in = spec.shape
        packed = weights.read(spec.name, (n_out, -(-n_in // 4)))
        scales = weights.read(spec.name + quant.SCALE_SUFFIX, (n_out, n_in // group_size))
        return quant.hf_ternary_weight(packed, scales, group_size)

    sources = collections.defaultdict(list)  # (param, layer) -> its tensors (the embedding may have two)
    for spec in plan:
        sources[spec.param, spec.layer].append(spec)
    for (param, layer), specs in sources.items():
        shape = shapes[param][1:] if layer is not None else shapes[param]
        folded = [(hf_layout.from_hf(s, read(s), shape), s.scale) for s in specs]
        params[param][layer if layer is not None else ...] = hf_layout.unfold(folded)
    return params


def import_hf(
    hf_dir: str, out: str, *, unfold_mup: bool = False, config: Config | None = None
) -> pathlib.Path:
    """Writes the new workdir `out` holding the HF checkpoint of `hf_dir` as step 0; returns its path."""
    hf_path = pathlib.Path(hf_dir)
    hf = read_hf_config(hf_path)
    layout = hf_layout.layout_of(hf, str(hf_path / "config.json"))
    fields = hf_layout.model_fields(hf, str(hf_path / "config.json"), unfold_mup)
    group_size = quant.exported_group_size(hf, str(hf_path / "config.json"))
    if group_size:  # the dequantised weights are the model: quantising them again would change them
        fields["quant"] = {"weights": "none"}
    config = (config or Config()).resolve()
    model = Config.from_dict({"model": {**to_dict(config.model), **fields}}).model
    config = config.replace(model=model, workdir=str(out))
    params = import_params(hf_path, config.model, layout, group_size)
    tokenizer = hf_path / TOKENIZER
    if tokenizer.is_file():
        read_tokenizer_file(tokenizer)  # refuse a broken tokenizer before writing anything

    return write_step0_workdir(out, config, params, tokenizer, imported_from=str(hf_path.absolute()))


def write_step0_workdir(out: str, config: Config, params: dict, tokenizer: pathlib.Path, **provenance) -> pathlib.Path:
    """A new workdir `out` whose step 0 holds `params` with a fresh optimizer state (and a copy of `tokenizer`
    if it exists): what mct.train resumes from. Written to a temporary sibling and renamed, so nothing is
    left half-written when anything fails."""
    params = jax.tree.map(jnp.asarray, params)
    state = {"params": params, "opt_state": jax.jit(make_optimizer(config, ParamsModel(config.model)).init)(params)}
    with fresh_directory(out) as tmp:
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        ckpt = Checkpointer(str(tmp), async_save=False)
        ckpt.save(0, state, None, run_meta(config, 0, **provenance))
        ckpt.wait()
        ckpt.close()
    return pathlib.Path(out)


def _define_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "HF model directory (config.json + safetensors).", required=True)
    flags.DEFINE_string("out", None, "New (or empty) mct workdir to write.", required=True)
    flags.DEFINE_bool("unfold_mup", False, "Llama layout: restore the muP scales folded in at export.")
    config_flags.DEFINE_config_file("config", None, "Training config the workdir is meant for.")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def train_command(config_file: str, workdir: pathlib.Path, base: Config) -> str:
    """The mct.train command that continues an imported workdir: the config file plus the imported model's
    fields where they differ from the file's (the checkpoint holds that model)."""
    imported = RunCheckpoint(workdir).model_cfg
    want, have = _flat(to_dict(imported)), _flat(to_dict(base.model))
    overrides = [f"--config.model.{k}={shlex.quote(str(tuple(v) if isinstance(v, list) else v))}"
                 for k, v in want.items() if have.get(k) != v]  # fmt: skip
    return " ".join(["python -m mct.train --config", config_file, f"--config.workdir={workdir}", *overrides])


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    config_file = config_flags.get_config_filename(f["config"]) if f.config else "experiments/configs/base.py"
    config = cli.config_from_flag(f.config) if f.config else Config()
    try:
        out = import_hf(f.hf_dir, f.out, unfold_mup=f.unfold_mup, config=config)
    except (OSError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    print(f"imported {f.hf_dir} into {out} (step 0); train on with:\n  {train_command(config_file, out, config)}")


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
