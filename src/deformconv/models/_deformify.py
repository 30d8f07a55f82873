"""``deformify``: convert chosen ``nn.Conv2d`` layers of a model into ``DeformConv2d``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from deformconv.nn import DeformConv2d
from deformconv.nn.deform_conv import plain_forward

__all__ = ["deformify", "spatial_convs"]

_log = logging.getLogger("deformconv")


def _is_spatial(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1


def _candidates(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Spatial convs in registration order, skipping anything inside a DeformConv2d."""
    found: list[tuple[str, nn.Conv2d]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, DeformConv2d):
            return  # its conv_offset is part of the layer, not a candidate
        if _is_spatial(module) and id(module) not in seen:
            seen.add(id(module))
            found.append((prefix, module))  # type: ignore[arg-type]
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return found


def spatial_convs(model: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """Names of the spatial (kernel larger than 1x1) ``nn.Conv2d`` layers, in forward order.

    With ``example_input``, forward order is the order of first calls during one
    forward pass of ``model(example_input)`` (run under ``torch.no_grad()`` in eval
    mode, so batch-norm statistics are untouched; training flags are restored);
    convolutions that the pass never calls are left out. Without it, forward order is
    taken to be module registration order (``named_modules()``), which is the
    execution order for torchvision ResNets, VGG, MobileNets and most ``nn.Sequential``
    models. Convolutions inside a ``DeformConv2d`` (its ``conv_offset``) never count.

    Args:
        model: any ``nn.Module``.
        example_input: optional input for one tracing forward pass, e.g. (1, 3, H, W).

    Returns:
        Qualified module names (``""`` for the root itself).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1),
        ...                           torch.nn.Conv2d(4, 4, 3))
        >>> spatial_convs(net)
        ['0', '2']
    """
    candidates = _candidates(model)
    if example_input is None:
        return [name for name, _ in candidates]
    order: list[str] = []
    hooks = []
    for name, conv in candidates:

        def hook(module: nn.Module, args: object, output: object, name: str = name) -> None:
            if name not in order:
                order.append(name)

        hooks.append(conv.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return order


def deformify(
    model: nn.Module,
    *,
    last: int = 3,
    names: Sequence[str] | None = None,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    offset_groups: int = 1,
    modulated: bool = False,
    mask_activation: str = "2sigmoid",
    record: bool = False,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Convert convolutions of ``model`` into :class:`~deformconv.DeformConv2d`, in place.

    Selects the last ``last`` spatial (kernel larger than 1x1) convolutions in forward
    order (see :func:`spatial_convs` for how forward order is found, with or without
    ``example_input``), every spatial convolution for which ``predicate(name, conv)``
    is true, or exactly the modules named in ``names``. Each one is replaced
    by ``DeformConv2d.from_conv(conv)``: same weights, bias, stride, padding, dilation
    and groups, same device, dtype and training mode, and a zero-initialised offset
    predictor, so the converted model computes exactly what it computed before until it
    is trained (with the default ``mask_activation``). A convolution shared by several
    parents is replaced everywhere.

    ``nn.Conv2d`` subclasses that override ``forward`` or ``_conv_forward`` (timm's
    ``Conv2dSame``, which pads by the input's size; weight-standardised convolutions)
    compute something a ``DeformConv2d`` would not: selecting one raises ``TypeError``,
    and ``predicate`` never sees them (choose others with ``names`` or ``predicate``).

    What was converted is reported twice: logged at INFO level on the ``deformconv``
    logger, and attached to the returned model as ``model.deformified``, a list of the
    converted modules' qualified names (extended by later calls).

    Args:
        model: any ``nn.Module`` (e.g. a torchvision ResNet: ``last=3`` picks
            ``layer4.0.conv2``, ``layer4.1.conv2``, ``layer4.2.conv2``, the paper's res5a-c).
        last: how many of the last spatial convolutions to convert (ignored when ``names``
            or ``predicate`` is given).
        names: qualified module names (as in ``model.named_modules()``) of the
            ``nn.Conv2d`` layers to convert.
        predicate: ``predicate(name, conv) -> bool`` over the spatial, plain
            ``nn.Conv2d`` layers (qualified name and module); those it accepts are
            converted. Not together with ``names``.
        offset_groups: G of the new layers; must divide each converted layer's C_in.
        modulated: make the new layers modulated (DCNv2).
        mask_activation: of the new layers; see :class:`~deformconv.DeformConv2d`.
        record: of the new layers; see :class:`~deformconv.DeformConv2d`.
        example_input: optional input used to find forward order with hooks.

    Returns:
        ``model`` itself, or the new ``DeformConv2d`` when ``model`` is itself the one
        convolution converted (as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a named module is not an
            ``nn.Conv2d``, or a selected one overrides ``nn.Conv2d``'s forward.
        ValueError: ``last`` is not a positive int, the model has fewer than ``last``
            spatial convolutions, a name does not exist, ``predicate`` selects nothing
            or comes with ``names``, or a convolution cannot be
            converted (non-zero ``padding_mode``, ``offset_groups`` not dividing C_in).

    Example:
        >>> import torch
        >>> from deformconv import deformify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 8, 3, padding=1, stride=2))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> before = net(x)
        >>> net = deformify(net, last=1)
        >>> net.deformified
        ['2']
        >>> torch.allclose(net(x), before, atol=1e-5), net(x).shape
        (True, torch.Size([1, 8, 8, 8]))
    """
    where = "deformify"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module; got {type(model).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    if names is not None and predicate is not None:
        raise ValueError(f"{where}: give names or predicate, not both")
    if predicate is not None:
        selected = [
            name
            for name in spatial_convs(model, example_input)
            if plain_forward(modules[name]) and predicate(name, modules[name])  # type: ignore[arg-type]
        ]
        if not selected:
            raise ValueError(f"{where}: predicate selected no spatial nn.Conv2d of model")
    elif names is not None:
        if isinstance(names, str):
            raise TypeError(f"{where}: names must be a sequence of module names; got a str")
        selected = []
        for name in names:
            if name not in modules:
                raise ValueError(f"{where}: names has {name!r}, which is not a module of model")
            parent = modules[name.rpartition(".")[0]] if name else None
            if not isinstance(modules[name], nn.Conv2d) or isinstance(parent, DeformConv2d):
                raise TypeError(
                    f"{where}: names must name nn.Conv2d modules outside DeformConv2d layers; "
                    f"{name!r} is a {type(modules[name]).__name__}"
                    + (" inside a DeformConv2d" if isinstance(parent, DeformConv2d) else "")
                )
            if name not in selected:
                selected.append(name)
    else:
        if not isinstance(last, int) or isinstance(last, bool) or last < 1:
            raise ValueError(f"{where}: last must be a positive int; got {last!r}")
        order = spatial_convs(model, example_input)
        if len(order) < last:
            raise ValueError(
                f"{where}: last={last} but model has only {len(order)} spatial convolutions "
                f"({order})"
            )
        selected = order[-last:]

    # Build every replacement first, so a failure leaves the model untouched.
    new: dict[int, DeformConv2d] = {}
    for name in selected:
        conv = modules[name]
        if id(conv) not in new:
            try:
                new[id(conv)] = DeformConv2d.from_conv(
                    conv,  # type: ignore[arg-type]
                    offset_groups=offset_groups,
                    modulated=modulated,
                    mask_activation=mask_activation,
                    record=record,
                )
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}: cannot convert {name!r}: {err}") from err
    if "" in selected:
        root = new[id(model)]
        root.deformified = [""]  # type: ignore[assignment]
        _log.info("deformify: converted the root convolution")
        return root
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter hides a child registered twice.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])
    done = list(getattr(model, "deformified", [])) + selected
    model.deformified = done  # type: ignore[assignment]
    _log.info("deformify: converted %d convolution(s): %s", len(selected), ", ".join(selected))
    return model
