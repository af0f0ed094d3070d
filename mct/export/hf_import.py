"""A Hugging Face Llama- or MiniCPM-layout safetensors checkpoint (OpenBMB's releases as published included) as a
new mct workdir at step 0 (fresh optimizer state, fresh data iterator), the inverse of `hf_export` bit for bit.

The model shape comes from config.json; the optimizer the saved state is built for from the run config given.
A Llama layout reads as a scale-free model unless `unfold_mup` restores the muP scales recorded at export; a
ternary export reads back as its dequantised weights (model.quant.weights = "none", docs/bitcpm.md).
"""

import collections
import contextlib
import json
import pathlib
from collections.abc import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from data_pipelines.chat import IM_END
from data_pipelines.tokenizer import BOS, EOS, TextTokenizer, TokenizerError, has_tokenizer, load_tokenizer
from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.config.schema import to_dict
from mct.export import hf_layout
from mct.export.hf_export import INDEX_FILE
from mct.model import quant
from mct.model.decoder import ParamsModel
from mct.run.workdir import write_step0_workdir

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters save; recomputed from the config


@contextlib.contextmanager
def open_safetensors(path: pathlib.Path) -> Iterator:
    """safe_open(path) for NumPy arrays; a damaged file (truncated, a bad header) is a ValueError naming it
    instead of safetensors' own error type, which entry points would not know."""
    try:
        with safe_open(path, "np") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


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
            with open_safetensors(hf_dir / "model.safetensors") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor {INDEX_FILE}")

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name`, checked to have `shape`."""
        if name not in self.files:
            raise ValueError(f"{self.hf_dir}: the checkpoint lacks the tensor {name!r}")
        path = self.hf_dir / self.files[name]
        with open_safetensors(path) as f:
            tensor = f.get_tensor(name)
        if tensor.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tensor.shape}, config.json implies {shape}")
        return tensor


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    """The config.json of an HF directory: a JSON object, else a ValueError naming the file."""
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, not a {type(config).__name__}")
    return config


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
        raise ValueError(
            f"{hf_dir}: tensors this model has no place for (biases? another architecture?): "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
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
    if "attention" not in fields and config.model.attention == "infllm_v2":  # a dense checkpoint stays dense
        fields["attention"] = config.model.dense_attention
    model = Config.from_dict({"model": {**to_dict(config.model), **fields}}).model
    config = config.replace(model=model, workdir=str(out))
    params = import_params(hf_path, config.model, layout, group_size)
    tokenizer = (
        load_tokenizer(hf_path) if has_tokenizer(hf_path) else None
    )  # refused before anything is written
    if tokenizer is not None:
        check_special_ids(hf, tokenizer, hf_path)

    return write_step0_workdir(out, config, params, tokenizer, imported_from=str(hf_path.absolute()))


def check_special_ids(hf: dict, tokenizer: TextTokenizer, hf_path: pathlib.Path) -> None:
    """TokenizerError naming both files when config.json's bos_token_id / eos_token_id are not the tokenizer's
    `<s>` and its end tokens (`</s>`, `<|im_end|>`)."""
    ends = {tokenizer.token_to_id(token) for token in (EOS, IM_END)} - {None}
    eos = hf.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    bos = hf.get("bos_token_id")
    if (bos is not None and bos != tokenizer.token_to_id(BOS)) or not set(eos) <= ends:
        raise TokenizerError(
            f"{hf_path / 'config.json'} gives bos_token_id {bos}, eos_token_id {hf.get('eos_token_id')}, but the "
            f"tokenizer in {hf_path} has {BOS} {tokenizer.token_to_id(BOS)} and end tokens {sorted(ends)}"
        )
