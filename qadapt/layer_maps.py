"""Per-architecture tables of adapter-targetable layers, loaded from ``layer_maps/*.json``.

The tables are data: module path templates, short PEFT target names, shape
expressions over a normalised config, GGUF tensor names and the base formats an
adapter on that layer is supported for. Everything that differs between
architectures in *which layers exist* lives there; this module only loads,
validates and evaluates them.
"""

from __future__ import annotations

import ast
import functools
import json
import operator
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import FormatError, QadaptError, UnsupportedError

BASE_FORMATS = ("full", "gguf", "gptq", "bnb")
ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "lm_head", "router", "expert_gate",
         "expert_up", "expert_down")
NORMALISED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
#: normalised keys a table may define (mixture-of-experts models); absent from the config of the others
OPTIONAL_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
_MODULE_KEYS = {
    "name": str,
    "path": str,
    "role": str,
    "in_features": str,
    "out_features": str,
    "gguf": str,
    "formats": list,
    "gguf_permute_heads": str,
    "fused": list,
    "bias": bool,
    "conv1d": bool,
    "tied_to": str,
}
_MODULE_REQUIRED = ("name", "path", "role", "in_features", "out_features", "gguf", "formats")
_TOP_KEYS = {
    "schema_version": int,
    "architecture": str,
    "description": str,
    "hf_model_types": list,
    "gguf_architectures": list,
    "config": dict,
    "gguf_config": dict,
    "modules": list,
}


# --------------------------------------------------------------------------- expressions
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


class _Missing(Exception):
    pass


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError(f"unsupported syntax {ast.dump(node)}")


def _check_expr(expr: str) -> ast.Expression:
    """Parse a shape expression; only integers, (dotted) names and + - * // are allowed."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        ok = isinstance(
            node,
            (ast.Expression, ast.BinOp, ast.Name, ast.Attribute, ast.Load, ast.Constant, *_BINOPS),
        )
        if not ok or (isinstance(node, ast.Constant) and not isinstance(node.value, int)):
            raise ValueError(f"expression {expr!r}: only integers, names and + - * // are allowed")
    return tree


def evaluate(expr: str, env: Mapping[str, Any]) -> int:
    """Evaluate a shape expression over ``env``; raises KeyError naming a missing key."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            key = _dotted(node)
            value = env.get(key)
            if value is None:
                raise _Missing(key)
            return int(value)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if right == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
                raise FormatError(f"shape expression {expr!r} divides by zero: {ast.unparse(node.right)} is 0 "
                                  f"in the model's config (a head count or size of 0?)")
            return _BINOPS[type(node.op)](left, right)
        raise ValueError(expr)

    try:
        return ev(_check_expr(expr))
    except _Missing as e:
        raise KeyError(e.args[0]) from None


def resolve_first(candidates: list[str], env: Mapping[str, Any]) -> int | None:
    """The first candidate expression whose names are all present in ``env``."""
    for expr in candidates:
        try:
            return evaluate(expr, env)
        except KeyError:
            continue
    return None


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class LayerSpec:
    """One adapter-targetable layer of an architecture."""

    name: str  # short PEFT target name, e.g. ``q_proj``
    path: str  # template with ``{layer_idx}``, or a fixed path (``lm_head``)
    role: str  # what the decoder does with it: q k v o qkv gate up gate_up down lm_head
    in_features: str
    out_features: str
    gguf: str
    formats: tuple[str, ...]
    gguf_permute_heads: str | None = None  # llama.cpp permutes these rows (q/k)
    fused: tuple[str, ...] = ()  # output slices of a fused layer (qkv, gate_up)
    bias: bool = False
    conv1d: bool = False  # transformers stores the weight [in, out]
    tied_to: str | None = None

    @property
    def per_block(self) -> bool:
        return "{layer_idx}" in self.path

    @property
    def per_expert(self) -> bool:
        """One module per expert of a mixture-of-experts layer (``{expert_idx}`` in the path; in GGUF all
        the experts' weights are one merged tensor, [experts, out, in])."""
        return "{expert_idx}" in self.path

    def module_path(self, layer_idx: int | None = None, expert_idx: int | None = None) -> str:
        if not self.per_block:
            return self.path
        return self.path.format(layer_idx=layer_idx, expert_idx=expert_idx)

    def gguf_name(self, layer_idx: int | None = None) -> str:
        return self.gguf.format(layer_idx=layer_idx) if "{layer_idx}" in self.gguf else self.gguf

    def shape(self, config: Mapping[str, int]) -> tuple[int, int]:
        """(in_features, out_features) under a normalised config."""
        return evaluate(self.in_features, config), evaluate(self.out_features, config)


@dataclass(frozen=True)
class ResolvedLayer:
    """A concrete module of a concrete model: ``model.layers.3.self_attn.q_proj``."""

    path: str
    spec: LayerSpec
    layer_idx: int | None


@dataclass(frozen=True, eq=False)
class LayerMap:
    architecture: str
    description: str
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    config_exprs: Mapping[str, tuple[str, ...]]
    gguf_config_exprs: Mapping[str, tuple[str, ...]]
    layers: tuple[LayerSpec, ...]
    source: str = field(default="", compare=False)
    embedding_path: str | None = None  # the token embedding's module path (embedding LoRA, saved tables)

    # ---- names
    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for s in self.layers))

    @property
    def path_templates(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.layers)

    # ---- configs
    def normalise_hf_config(self, raw: Mapping[str, Any]) -> dict[str, int]:
        """Our normalised config (``NORMALISED_KEYS``) from a transformers ``config.json``."""
        return self._normalise(self.config_exprs, raw, "config.json")

    def normalise_gguf_metadata(self, meta: Mapping[str, Any]) -> dict[str, int]:
        """Normalised config from GGUF metadata with the ``{arch}.`` prefix stripped."""
        return self._normalise(self.gguf_config_exprs, meta, "GGUF metadata")

    def _normalise(self, exprs, raw, what: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in NORMALISED_KEYS + tuple(k for k in OPTIONAL_KEYS if k in exprs):
            value = resolve_first(list(exprs[key]), raw)
            if value is None:
                wanted = " or ".join(f"`{e}`" for e in exprs[key])
                raise FormatError(f"{what} for a {self.architecture} model lacks {wanted} (needed for {key})")
            out[key] = value
        return out

    def modules(self, shapes: Mapping[str, int], targets: list[str] | None = None) -> list["ResolvedLayer"]:
        """:meth:`enumerate_modules` for a model of these normalised shapes (its experts included)."""
        return self.enumerate_modules(shapes["num_hidden_layers"], targets, shapes.get("num_experts", 0))

    # ---- enumeration
    def enumerate_modules(
        self, num_hidden_layers: int, targets: list[str] | None = None, num_experts: int = 0
    ) -> list[ResolvedLayer]:
        """Modules in PEFT's enumeration order: per block in definition order (each expert's in turn),
        then top-level.

        This mirrors ``named_modules()`` of the transformers model (the table lists
        layers in definition order), so the index of a module here is its X-LoRA
        classifier row.
        """
        wanted = None if targets is None else set(targets)
        out: list[ResolvedLayer] = []
        experts = [s for s in self.layers if s.per_expert and (wanted is None or s.name in wanted)]
        for i in range(num_hidden_layers):
            for s in self.layers:
                if s.per_block and not s.per_expert and (wanted is None or s.name in wanted):
                    out.append(ResolvedLayer(s.module_path(i), s, i))
            for e in range(num_experts):
                out.extend(ResolvedLayer(s.module_path(i, e), s, i) for s in experts)
        for s in self.layers:
            if not s.per_block and (wanted is None or s.name in wanted):
                out.append(ResolvedLayer(s.path, s, None))
        return out

    def match_path(self, path: str) -> tuple[LayerSpec, int | None] | None:
        """The spec and block index of a concrete module path, or None."""
        for s, rx in zip(self.layers, _path_regexes(self)):
            m = rx.fullmatch(path)
            if m:
                return s, (int(m.group(1)) if s.per_block else None)
        return None

    def iter_specs(self) -> Iterator[LayerSpec]:
        return iter(self.layers)


@functools.lru_cache(maxsize=None)
def _path_regexes(lm: LayerMap) -> tuple[re.Pattern, ...]:
    return tuple(
        re.compile(re.escape(s.path).replace(re.escape("{layer_idx}"), r"(\d+)").replace(re.escape("{expert_idx}"),
                                                                                         r"(\d+)"))
        for s in lm.layers
    )


def expert_of(path: str, spec: LayerSpec) -> int | None:
    """The expert index in a per-expert module path."""
    if not spec.per_expert:
        return None
    m = re.fullmatch(re.escape(spec.path).replace(re.escape("{layer_idx}"), r"\d+").replace(
        re.escape("{expert_idx}"), r"(\d+)"), path)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- loading
def _tables_dir() -> Path:
    """``qadapt/data/layer_maps/``, inside the package (the checkout's top-level ``layer_maps`` links to it)."""
    return Path(str(resources.files("qadapt") / "data" / "layer_maps"))


def _fail(src: str, where: str, msg: str) -> None:
    raise FormatError(f"layer map {src}: {where}: {msg}")


def parse_layer_map(data: Any, source: str = "<memory>") -> LayerMap:
    """Validate a table against the schema and build a :class:`LayerMap`."""
    if not isinstance(data, dict):
        _fail(source, "top level", "expected a JSON object")
    for key, typ in _TOP_KEYS.items():
        if key not in data:
            _fail(source, key, "missing")
        if not isinstance(data[key], typ):
            _fail(source, key, f"expected {typ.__name__}, got {type(data[key]).__name__}")
    extra = set(data) - set(_TOP_KEYS) - {"embedding"}
    emb = data.get("embedding")
    if emb is not None and (not isinstance(emb, dict) or set(emb) != {"path", "gguf"}
                            or not all(isinstance(v, str) for v in emb.values())):
        _fail(source, "embedding", 'expected {"path": ..., "gguf": ...} (strings)')
    if extra:
        _fail(source, ", ".join(sorted(extra)), "unknown key(s)")
    if data["schema_version"] != 1:
        _fail(source, "schema_version", f"expected 1, got {data['schema_version']}")
    for section in ("config", "gguf_config"):
        sec = data[section]
        for key in NORMALISED_KEYS:
            exprs = sec.get(key)
            if not isinstance(exprs, list) or not exprs or not all(isinstance(e, str) for e in exprs):
                _fail(source, f"{section}.{key}", "expected a non-empty list of expressions")
            for e in exprs:
                try:
                    _check_expr(e)
                except (ValueError, SyntaxError) as err:
                    _fail(source, f"{section}.{key}", str(err))
        for key in OPTIONAL_KEYS:
            if key in sec and (not isinstance(sec[key], list) or not sec[key]):
                _fail(source, f"{section}.{key}", "expected a non-empty list of expressions")
        unknown = set(sec) - set(NORMALISED_KEYS) - set(OPTIONAL_KEYS)
        if unknown:
            _fail(source, f"{section}", f"unknown key(s) {sorted(unknown)}; expected {list(NORMALISED_KEYS)}")
    specs = []
    seen_paths = set()
    for i, m in enumerate(data["modules"]):
        where = f"modules[{i}]"
        if not isinstance(m, dict):
            _fail(source, where, "expected an object")
        for key in _MODULE_REQUIRED:
            if key not in m:
                _fail(source, f"{where}.{key}", "missing")
        for key, value in m.items():
            if key not in _MODULE_KEYS:
                _fail(source, f"{where}.{key}", f"unknown key; expected one of {sorted(_MODULE_KEYS)}")
            if not isinstance(value, _MODULE_KEYS[key]):
                _fail(source, f"{where}.{key}", f"expected {_MODULE_KEYS[key].__name__}")
        for key in ("in_features", "out_features", "gguf_permute_heads"):
            if key in m:
                try:
                    _check_expr(m[key])
                except (ValueError, SyntaxError) as err:
                    _fail(source, f"{where}.{key}", str(err))
        for e in m.get("fused", []):
            try:
                _check_expr(e)
            except (ValueError, SyntaxError) as err:
                _fail(source, f"{where}.fused", str(err))
        if m["role"] not in ROLES:
            _fail(source, f"{where}.role", f"{m['role']!r}: expected one of {list(ROLES)}")
        bad = [f for f in m["formats"] if f not in BASE_FORMATS]
        if bad or not m["formats"]:
            _fail(source, f"{where}.formats", f"{bad or 'empty'}: expected a subset of {list(BASE_FORMATS)}")
        fields = set(re.findall(r"{(\w*)}", m["path"]))
        if fields - {"layer_idx", "expert_idx"} or ("expert_idx" in fields and "layer_idx" not in fields):
            _fail(source, f"{where}.path", f"only {{layer_idx}} (and within it {{expert_idx}}) may be substituted, "
                                           f"got {sorted(fields)}")
        if m["path"] in seen_paths:
            _fail(source, f"{where}.path", f"duplicate path {m['path']}")
        seen_paths.add(m["path"])
        specs.append(
            LayerSpec(
                name=m["name"],
                path=m["path"],
                role=m["role"],
                in_features=m["in_features"],
                out_features=m["out_features"],
                gguf=m["gguf"],
                formats=tuple(m["formats"]),
                gguf_permute_heads=m.get("gguf_permute_heads"),
                fused=tuple(m.get("fused", ())),
                bias=m.get("bias", False),
                conv1d=m.get("conv1d", False),
                tied_to=m.get("tied_to"),
            )
        )
    return LayerMap(
        architecture=data["architecture"],
        description=data["description"],
        hf_model_types=tuple(data["hf_model_types"]),
        gguf_architectures=tuple(data["gguf_architectures"]),
        config_exprs={k: tuple(v) for k, v in data["config"].items()},
        gguf_config_exprs={k: tuple(v) for k, v in data["gguf_config"].items()},
        layers=tuple(specs),
        source=source,
        embedding_path=emb["path"] if emb else None,
    )


def load_layer_map_file(path: Path) -> LayerMap:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"layer map {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    lm = parse_layer_map(data, str(path))
    if lm.architecture != Path(path).stem:
        _fail(str(path), "architecture", f"{lm.architecture!r} does not match the file name")
    return lm


@functools.lru_cache(maxsize=None)
def all_layer_maps() -> dict[str, LayerMap]:
    tables = sorted(_tables_dir().glob("*.json"))
    if not tables:
        raise QadaptError(f"no layer maps found in {_tables_dir()} (broken installation?)")
    return {p.stem: load_layer_map_file(p) for p in tables}


def supported_architectures() -> list[str]:
    return sorted(all_layer_maps())


def get_layer_map(arch: str) -> LayerMap:
    """The table of an architecture name, a transformers ``model_type`` or a GGUF architecture."""
    maps = all_layer_maps()
    key = arch.lower()
    if key in maps:
        return maps[key]
    for lm in maps.values():
        if key in lm.hf_model_types or key in lm.gguf_architectures:
            return lm
    raise UnsupportedError(
        f"architecture `{arch}` is not supported; supported: {', '.join(supported_architectures())}"
    )


def gguf_layer_map(gf) -> LayerMap:
    """The table of a GGUF file: its declared architecture, except that llama.cpp writes Mixtral as `llama`
    with an expert count."""
    if gf.architecture == "llama" and gf.get("llama.expert_count"):
        return get_layer_map("mixtral")
    return get_layer_map(gf.architecture)


def base_format_of(quant: str | None) -> tuple[str, str | None]:
    """Map a ``--quant`` value to (base format, canonical quant name).

    ``None``/``none``/``f32``/``f16``/``bf16`` run as full precision; GGUF type
    names (``Q4_K``, ``Q8_0`` ...) as ``gguf``; ``gptq-4bit`` as ``gptq``;
    ``nf4``/``fp4``/``int8`` as ``bnb``.
    """
    from .quant.types import GGML_TYPE_NAMES  # table of GGUF type names

    if quant is None:
        return "full", None
    q = quant.strip()
    low = q.lower()
    if low in ("none", "full", "f32", "fp32", "float32", "f16", "fp16", "bf16"):
        return "full", low
    if low in ("nf4", "fp4", "int8", "bnb-nf4", "bnb-fp4", "bnb-int8", "llm_int8"):
        return "bnb", low.removeprefix("bnb-").replace("llm_int8", "int8")
    m = re.fullmatch(r"gptq(?:[-_ ]?(\d)[-_ ]?bits?)?", low)
    if m:
        return "gptq", f"gptq-{m.group(1) or 4}bit"
    up = q.upper()
    for suffix in ("_M", "_S", "_L"):  # llama.cpp's mix names, e.g. Q4_K_M
        if up.endswith(suffix) and up[: -len(suffix)] in GGML_TYPE_NAMES:
            up = up[: -len(suffix)]
    if up in GGML_TYPE_NAMES:
        return "gguf", up
    raise UnsupportedError(
        f"unknown quant type `{quant}`; expected a GGUF type ({', '.join(GGML_TYPE_NAMES)}), "
        "gptq-2bit/3bit/4bit/8bit, nf4, fp4 or int8"
    )


def hf_layer_map(raw: dict[str, Any], where: Path) -> LayerMap:
    """The layer map of a ``config.json``'s ``model_type``; unknown types list the supported ones."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedError(f"{where}: config.json has no `model_type`; cannot tell the architecture")
    return get_layer_map(model_type)
