"""The public API's annotations: complete, and resolvable at run time (the package ships py.typed, so
type checkers and IDEs show users these types; a missing or broken one shows them Any or an error)."""
import inspect
import typing

import pytest

import vlmrm_fast

pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")
import vlmrm_fast.train  # noqa: E402


def _public_functions(obj):
    """(qualified name, function) for a function, or a class's own public methods, properties,
    classmethods, ``__init__`` and ``__call__``."""
    if inspect.isfunction(obj):
        yield obj.__name__, obj
    if not inspect.isclass(obj):
        return
    for name, value in vars(obj).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(value, property):
            value = value.fget
        elif isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            yield f"{obj.__name__}.{name}", value


PUBLIC = [(f"{module.__name__}.{qual}", fn) for module in (vlmrm_fast, vlmrm_fast.train) for name in module.__all__
          if not (inspect.isclass(getattr(module, name)) and issubclass(getattr(module, name), BaseException))
          for qual, fn in _public_functions(getattr(module, name))]


def test_the_api_list_is_not_empty():
    names = {name for name, _ in PUBLIC}
    assert {"vlmrm_fast.CLIPReward.from_pretrained", "vlmrm_fast.CLIPReward.__call__",
            "vlmrm_fast.VLMRewardVecEnv.step_wait", "vlmrm_fast.train.train"} <= names


@pytest.mark.parametrize("name, fn", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_functions_are_fully_annotated(name, fn):
    hints = typing.get_type_hints(fn)  # also: every name in the annotations exists at run time
    missing = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls") and p not in hints]
    assert not missing and "return" in hints, f"{name}: unannotated {missing or ''} {'' if 'return' in hints else 'return'}"
