"""Construction apart from running: ``build(cfg) -> Run`` makes everything a run needs.

    run = build(cfg)                       # checked before anything is compiled
    state = run.restore_or_init(ckpt)      # or run.init_state()
    state, metrics = run.train_step(state, run.frozen(), batch)

The loop, inference, `make info` and the benchmarks all call it, so they build the same mesh,
data, networks, state shardings and jitted step. The method (``methods.get(cfg.method)``)
says which networks to build, which of them train and with which optimizer, which EMAs to
keep and which gradient updates make a step; nothing here names a method.

Frozen trees (frozen networks, and the frozen rest of a network whose group is a subset, the
LoRA case) are loaded once (``Run.frozen``), sharded by the same FSDP rule as the state,
passed to the step as a separate, non-donated argument, and never checkpointed: the
checkpoint's `extra` records their source and digest (``Run.frozen_record``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os

import jax
import numpy as np

from diffusax import checkpoint, methods, parallel
from diffusax import config as config_lib
from diffusax import data as data_lib
from diffusax.models import make_apply_fn
from diffusax.train import optim
from diffusax.train.state import (
    abstract_train_state,
    create_train_state,
    flat_paths,
    merge_trees,
    split_params,
    split_tree,
    subset_paths,
)
from diffusax.train.step import make_train_step

log = logging.getLogger("diffusax")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the networks are built for: the examples' shape and the model's classes.

    ``num_classes`` is the class count the model is conditioned on (None: unconditional);
    ``dataset_classes`` the dataset's own. ``missing`` says why the data could not be opened
    (only with ``build(..., require_data=False)``: the shapes then come from the config's
    declared ``data.image_shape`` / ``data.num_classes``).
    """

    name: str
    image_shape: tuple
    num_classes: int | None
    dataset_classes: int | None
    info: object = None  # the data source's DatasetInfo, when it was opened
    missing: str = ""


@dataclasses.dataclass
class Context:
    """What a method's ``updates`` may use: the config, data spec, mesh and networks."""

    cfg: object
    data: DataSpec
    mesh: object
    graphdefs: dict  # {network: nnx graphdef}
    subsets: dict  # {network: frozenset of trainable paths} for networks trained in part
    group_of: dict  # {network: its trainable group}

    def network_params(self, name: str, params: dict, frozen: dict) -> dict:
        """The whole parameter tree of network ``name`` (trainable part and frozen rest)."""
        group = self.group_of.get(name)
        if group is None:
            return frozen[name]
        if name in self.subsets:
            return merge_trees(params[group], frozen[name])
        return params[group]

    def module(self, name: str, tree: dict):
        """The nnx module of network ``name`` with the parameters ``tree`` (``nnx.merge``)."""
        from flax import nnx

        return nnx.merge(self.graphdefs[name], tree)

    def apply_fn(self, name: str):
        """``apply_fn(tree, x, t, y, dropout_key)`` of a denoising network (``models``)."""
        return make_apply_fn(self.graphdefs[name])


@dataclasses.dataclass
class Run:
    """A built run: call ``init_state`` / ``restore_or_init``, then ``train_step``."""

    cfg: object
    method: object
    mesh: object
    data: DataSpec
    source: object  # the training data source (None when it is missing)
    networks: dict  # {name: methods.Network}
    ctx: Context
    optimizers: dict  # {group: optax transformation}
    emas: dict  # {name: methods.Ema}
    init_key: object
    abstract: object  # TrainState of ShapeDtypeStructs
    shardings: object  # TrainState of NamedShardings
    step_fn: object  # the pure train_step(state, frozen, batch)

    def init_params(self, key) -> dict:
        """{group: tree} at initialisation (network i is built with fold_in(key, i); i=0: key)."""
        return self.trainable_params(
            lambda i, name, net: net.build(key if i == 0 else jax.random.fold_in(key, i))
        )

    def trainable_params(self, model_of) -> dict:
        """{group: its trainable tree} of the models ``model_of(i, name, network)``."""
        params = {}
        for i, (name, net) in enumerate(self.networks.items()):
            group = self.ctx.group_of.get(name)
            if group is None:
                continue
            _, tree = split_params(model_of(i, name, net))
            if name in self.ctx.subsets:
                tree = split_tree(tree, self.ctx.subsets[name])[0]
            params[group] = tree
        return params

    def init_state(self):
        """The step-0 state, born in its sharding (networks with ``init_from``: their loaded
        trees over the initialised ones, passed in as arguments rather than constants)."""
        starts = {
            self.ctx.group_of[name]: (name, net.init_from())
            for name, net in self.networks.items()
            if net.trainable and net.init_from is not None
        }
        if not starts:
            return create_train_state(
                self.init_params, self.optimizers, self.emas, self.init_key, self.shardings
            )
        abstract = self.abstract.params
        loaded = {  # {group: {path: array}}, checked against the group's shapes
            group: _start_leaves(name, self.networks[name].source, tree, abstract[group])
            for group, (name, tree) in starts.items()
        }

        def init_params(key, loaded):
            params = self.init_params(key)
            for group, leaves in loaded.items():
                params[group] = jax.tree_util.tree_map_with_path(
                    lambda p, x, leaves=leaves: leaves.get(_path_key(p), x), params[group]
                )
            return params

        return create_train_state(
            init_params, self.optimizers, self.emas, self.init_key, self.shardings, loaded
        )

    @functools.cached_property
    def frozen_abstract(self) -> dict:
        return jax.eval_shape(self._frozen_from_init, self.init_key)

    @functools.cached_property
    def frozen_shardings(self) -> dict:
        return parallel.fsdp_shardings(self.frozen_abstract, self.mesh)

    def _frozen_from_init(self, key) -> dict:
        """Frozen trees as initialisation makes them (the shapes; the values of subset rests)."""
        out = {}
        for i, (name, net) in enumerate(self.networks.items()):
            if self.ctx.group_of.get(name) is not None and name not in self.ctx.subsets:
                continue
            _, tree = split_params(net.build(key if i == 0 else jax.random.fold_in(key, i)))
            if name in self.ctx.subsets:
                tree = split_tree(tree, self.ctx.subsets[name])[1]
            out[name] = tree
        return out

    @functools.cached_property
    def _frozen(self) -> dict:
        abstract = self.frozen_abstract
        if not abstract:
            return {}
        initial = None
        trees = {}
        for name in abstract:
            net = self.networks[name]
            if net.load is None:
                if initial is None:  # the rest of a subset network, as initialisation made it
                    initial = jax.jit(self._frozen_from_init)(self.init_key)
                trees[name] = initial[name]
                continue
            loaded = _match_keys(
                net.load(), abstract[name] if name not in self.ctx.subsets else None
            )
            if name in self.ctx.subsets:
                loaded = split_tree(loaded, self.ctx.subsets[name])[1]
            _check_frozen_shapes(name, net.source, loaded, abstract[name])
            trees[name] = loaded
        return jax.device_put(trees, self.frozen_shardings)

    def frozen(self) -> dict:
        """The frozen trees, loaded once and placed in their sharding."""
        return self._frozen

    def frozen_record(self) -> dict:
        """{network: {"source", "digest"}} of the frozen trees, for the checkpoint."""
        return {
            name: {"source": self.networks[name].source or "init", "digest": digest(tree)}
            for name, tree in self.frozen().items()
        }

    @functools.cached_property
    def train_step(self):
        """The step jitted with shardings; the state is donated, the frozen trees are not."""
        batch_sharding = parallel.batch_sharding(self.mesh)
        return jax.jit(
            self.step_fn,
            in_shardings=(self.shardings, self.frozen_shardings, batch_sharding),
            out_shardings=(self.shardings, parallel.replicated(self.mesh)),
            donate_argnums=0,
        )

    def abstract_with_shardings(self):
        """The abstract state whose leaves carry their target shardings (for restoring)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract,
            self.shardings,
        )

    def loader(self, start: int):
        """The training batches from step ``start`` on."""
        return data_lib.Loader(
            self.source,
            self.mesh,
            self.cfg.train.batch_size,
            self.cfg.seed,
            random_flip=self.cfg.data.random_flip,
            step=start,
        )

    def sample_params(self, state) -> dict:
        return self.method.sample_params(state, self.frozen(), self.cfg)


def load_from_run(run_dir: str, path: tuple[str, ...] = ("ema", "ema")):
    """A ``Network.load`` for weights trained by another run of this project: the subtree
    ``path`` of the latest checkpoint in ``run_dir`` (by default DDPM's EMA)."""

    def load():
        directory = os.path.join(run_dir, "checkpoints")
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"no checkpoint in {directory}: train that run first (its weights are frozen here)"
            )
        with checkpoint.Checkpointer(directory, save_every=1, keep=10**9, async_save=False) as c:
            return c.read_tree(tuple(path))

    return load


def digest(tree) -> str:
    """sha256 over a tree's paths, shapes, dtypes and bytes (host copy; frozen trees only)."""
    h = hashlib.sha256()
    for path, leaf in _flat(jax.tree.map(parallel.to_host, tree)):
        arr = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _match_keys(loaded, abstract):
    """``loaded`` with the integer keys of ``abstract`` (a checkpoint read without a target
    gives the list indices of an nnx.List as strings: "0" for 0)."""
    if abstract is None or not isinstance(loaded, dict) or not isinstance(abstract, dict):
        return loaded
    out = {}
    for key, value in loaded.items():
        if isinstance(key, str) and key.isdigit() and int(key) in abstract:
            key = int(key)
        out[key] = _match_keys(value, abstract.get(key))
    return out


def _check_frozen_shapes(name, source, loaded, abstract) -> None:
    want = {jax.tree_util.keystr(p): (tuple(x.shape), x.dtype) for p, x in _flat(abstract)}
    got = {
        jax.tree_util.keystr(p): (tuple(np.shape(x)), np.asarray(x).dtype) for p, x in _flat(loaded)
    }
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [k for k in set(want) & set(got) if want[k] != got[k]][:3]
        raise config_lib.ConfigError(
            f"frozen network {name!r} from {source!r} does not fit the config: missing "
            f"{missing}, unexpected {extra}, other shapes {[(k, got[k], want[k]) for k in shapes]}"
        )


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _start_leaves(name, source, tree, abstract) -> dict:
    """{path: array} of a loaded start tree, each path one of ``abstract``'s (a nested pure
    dict) with its shape: a ConfigError names what does not fit."""
    want = flat_paths(abstract)
    got = flat_paths(tree)
    extra = sorted(set(got) - set(want))[:3]
    shapes = [(p, np.shape(x), want[p].shape) for p, x in got.items() if p in want]
    shapes = [s for s in shapes if tuple(s[1]) != tuple(s[2])][:3]
    if extra or shapes:
        raise config_lib.ConfigError(
            f"network {name!r} cannot start from {source!r}: unexpected {extra}, other shapes "
            f"{shapes}"
        )
    return {p: np.asarray(x, want[p].dtype) for p, x in got.items()}


def _flat(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def open_data(cfg, *, require_data: bool = True):
    """(the training data source or None, DataSpec)."""
    try:
        if cfg.latents.dir:  # latent diffusion: the model's "images" are the VAE's latents
            from diffusax.data import latents

            if not require_data and cfg.latents.auto_encode:  # describing writes nothing
                cfg = cfg.copy_and_resolve_references()
                cfg.latents.auto_encode = False
            source = latents.open_source(cfg)
        else:
            source = open_split(cfg, cfg.data.train_split)
    except FileNotFoundError as e:
        if require_data:
            raise
        return None, _declared_spec(cfg, str(e))
    info = source.info
    _check_declared(cfg, tuple(info.image_shape), info.num_classes)
    if cfg.condition.kind == "text":  # batches carry captions, tokenized
        source = _captioned(cfg, source)
    if cfg.condition.kind == "embedding":
        _check_embeddings(cfg, info)
    classes = _model_classes(cfg, info.num_classes)
    spec = DataSpec(cfg.data.name, tuple(info.image_shape), classes, info.num_classes, info)
    return source, spec


def open_split(cfg, split: str):
    """The image source of the dataset's ``split`` (its embeddings too, for that condition)."""
    from diffusax.data import latents

    return data_lib.load_source(
        cfg.data.name,
        split,
        cfg.data.data_dir or None,
        image_key=cfg.data.image_key,
        label_key=cfg.data.label_key or None,
        embedding_key=latents.embedding_key(cfg),
    )


def _check_embeddings(cfg, info) -> None:
    """The dataset's embeddings have the shape the config declares (and the model takes)."""
    got = tuple(getattr(info, "embedding_shape", None) or ())
    want = tuple(cfg.condition.embedding_shape)
    if got != want:
        raise config_lib.ConfigError(
            f"config field 'condition.embedding_shape' declares {want} but dataset "
            f"{info.name!r} holds embeddings of shape {got} per example (feature "
            f"{cfg.condition.embedding_key!r})"
        )


def _captioned(cfg, source):
    from diffusax import conditions
    from diffusax.data.captioned import CaptionedSource

    try:
        return CaptionedSource(
            source, conditions.tokenizer_from_config(cfg), cfg.text.context_length
        )
    except ValueError as e:
        raise config_lib.ConfigError(f"config field 'condition.kind' is 'text': {e}") from e


def _declared_spec(cfg, why: str) -> DataSpec:
    shape, classes = tuple(cfg.data.image_shape), cfg.data.num_classes or None
    if len(shape) != 3:
        raise config_lib.ConfigError(
            f"the data is not there ({why}), and the config declares no shape to describe the "
            f"run without it: set data.image_shape=(H, W, C) (and data.num_classes)"
        )
    return DataSpec(cfg.data.name, shape, _model_classes(cfg, classes), classes, None, missing=why)


def _model_classes(cfg, num_classes):
    """The classes the network takes labels of (None: it takes none, or another condition)."""
    conditional = cfg.model.class_conditional or cfg.condition.kind == "label"
    return num_classes if conditional else None


def _check_declared(cfg, image_shape, num_classes) -> None:
    """The data holds what the config declares (where it declares anything)."""
    declared = tuple(cfg.data.image_shape)
    if declared and declared != tuple(image_shape):
        raise config_lib.ConfigError(
            f"config field 'data.image_shape' declares {declared} but the data holds "
            f"{tuple(image_shape)}"
        )
    if cfg.data.num_classes and cfg.data.num_classes != (num_classes or 0):
        raise config_lib.ConfigError(
            f"config field 'data.num_classes' declares {cfg.data.num_classes} but the data has "
            f"{num_classes or 0} classes"
        )


def build(cfg, *, devices=None, require_data: bool = True) -> Run:
    """Everything a run needs, checked before compiling: mesh, data, networks, state, step.

    ``require_data=False`` (``make info``) describes a run whose data is not prepared yet
    from the config's declared shapes; ``Run.data.missing`` says what is missing.
    """
    devices = list(jax.devices() if devices is None else devices)
    method = methods.get(cfg.method)
    method.validate(cfg)
    source, spec = open_data(cfg, require_data=require_data)
    config_lib.check_runtime(cfg, spec.image_shape, spec.dataset_classes, len(devices))
    mesh = parallel.make_mesh(cfg.train.mesh_data, cfg.train.mesh_fsdp, devices=devices)
    networks = dict(method.networks(cfg, spec))
    groups = dict(method.groups(cfg))
    init_key = jax.random.key(cfg.seed)
    graphdefs, abstract_models = {}, {}
    for name, net in networks.items():
        graphdefs[name], abstract_models[name] = _graphdef(cfg, spec, net, init_key)
    group_of, subsets = {}, {}
    for gname, group in groups.items():
        net = networks.get(group.network)
        if net is None or not net.trainable:
            raise ValueError(f"method {method.name!r}: group {gname!r} names no trainable network")
        if group.network in group_of:
            raise ValueError(f"method {method.name!r}: network {group.network!r} in two groups")
        group_of[group.network] = gname
        if group.subset is not None:
            paths = subset_paths(abstract_models[group.network], group.subset)
            if not paths:
                raise config_lib.ConfigError(
                    f"method {method.name!r}: group {gname!r} selects no parameter of network "
                    f"{group.network!r}"
                )
            subsets[group.network] = paths
    for name, net in networks.items():
        if net.trainable and name not in group_of:
            raise ValueError(f"method {method.name!r}: trainable network {name!r} has no group")
        if not net.trainable and net.load is None:
            raise ValueError(f"method {method.name!r}: frozen network {name!r} has no source")
    optimizers = {
        g: optim.make_optimizer(cfg[group.optim], cfg.train.num_steps)
        for g, group in groups.items()
    }
    emas = dict(method.emas(cfg))
    ctx = Context(cfg, spec, mesh, graphdefs, subsets, group_of)
    run = Run(
        cfg=cfg,
        method=method,
        mesh=mesh,
        data=spec,
        source=source,
        networks=networks,
        ctx=ctx,
        optimizers=optimizers,
        emas=emas,
        init_key=init_key,
        abstract=None,
        shardings=None,
        step_fn=None,
    )
    # From the abstract models above: tracing the networks' construction again costs seconds.
    abstract_params = run.trainable_params(lambda i, name, net: abstract_models[name])
    run.abstract = abstract_train_state(abstract_params, optimizers, emas)
    # Parameters, optimizer moments and EMAs split over the mesh's fsdp axis (replicated when
    # train.mesh_fsdp = 1, plain data parallelism); scalars such as the step replicated.
    run.shardings = parallel.fsdp_shardings(run.abstract, mesh)
    run.step_fn = make_train_step(
        method.updates(cfg, ctx),
        optimizers,
        emas,
        seed=cfg.seed,
        skip_nonfinite=cfg.train.nonfinite == "skip",
        accum_steps=cfg.train.grad_accum_steps,
        mesh=mesh,
    )
    return run


def _graphdef(cfg, spec, net, key):
    """(graphdef, abstract module) of a network; the model's own argument checks become a
    ConfigError naming the field, still without compiling anything."""
    from flax import nnx

    try:
        abstract = nnx.eval_shape(lambda: net.build(key))
        graphdef = getattr(net.build, "graphdef", None) or split_params(abstract)[0]
        net.build.graphdef = graphdef  # as model_graphdef keeps it
        return graphdef, abstract
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise
        # The model names its argument; most are fields of `config.model` of the same name.
        argument = str(e).split(" ")[0].split("=")[0]
        prefix = "model." if argument in cfg.model else ""
        raise config_lib.ConfigError(
            f"config 'model' ({cfg.model.name}) cannot be built for {spec.name!r} images of "
            f"shape {tuple(spec.image_shape)}: {prefix}{e}"
        ) from e
