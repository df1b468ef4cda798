"""The params spec (vimpo_kernels/params.py <-> csrc/params.h): each frozen dataclass has the
fields of its C++ struct, name for name and in order; a pack reads back through the C++
`from_packed` field for field; every op rejects a wrong pack with an error naming the struct."""

import ast
import dataclasses
import inspect

import pytest
import torch

from vimpo_kernels import _backends
from vimpo_kernels.logprobs import compiled_function  # noqa: F401  (registers vimpo::compiled_token_stats)
from vimpo_kernels.params import PARAMS_SPECS, EpilogueParams, GrpoParams, TokenStatsParams


@pytest.fixture(scope="module")
def ext():
    return _backends.require_extension()  # fails, never skips, when the extension is not built


def _distinct(cls):
    """An instance whose fields all differ from their defaults and from each other."""
    values = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        values[f.name] = {"float": 0.25 + i, "int": 2 + i, "bool": i % 2 == 0}[f.type]
    return cls(**values)


def test_every_struct_has_a_dataclass(ext):
    assert sorted(ext.param_names()) == sorted(PARAMS_SPECS)


@pytest.mark.parametrize("name", sorted(PARAMS_SPECS))
def test_dataclass_fields_are_the_struct_fields_in_order(ext, name):
    assert tuple(ext.param_names()[name]) == PARAMS_SPECS[name].names()


@pytest.mark.parametrize("name", sorted(PARAMS_SPECS))
def test_pack_reads_back_field_for_field(ext, name):
    params = _distinct(PARAMS_SPECS[name])
    got = ext.unpack_params(name, params.pack())
    want = dataclasses.asdict(params)
    assert list(got) == list(want)
    for field, value in want.items():
        assert got[field] == value and type(got[field]) is type(value), field
    assert PARAMS_SPECS[name].unpack(params.pack()) == params


@pytest.mark.parametrize("name", sorted(PARAMS_SPECS))
def test_dataclass_is_frozen_keyword_only_and_documented(name):
    cls = PARAMS_SPECS[name]
    params = _distinct(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params, cls.names()[0], 1.0)
    with pytest.raises(TypeError):
        cls(*params.pack())
    # A string right after each field: its docstring.
    body = ast.parse(inspect.getsource(cls)).body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}
    assert documented == set(cls.names())


@pytest.mark.parametrize("name", sorted(PARAMS_SPECS))
def test_wrong_length_is_rejected_naming_the_fields(ext, name):
    cls = PARAMS_SPECS[name]
    packed = _distinct(cls).pack()
    n = len(packed)
    for bad in (packed[:-1], packed + [0.0], []):
        with pytest.raises(RuntimeError, match=rf"{name}: expected {n} packed values \({', '.join(cls.names())}\), "
                                               rf"got {len(bad)}"):
            ext.unpack_params(name, bad)
        with pytest.raises(ValueError, match=rf"{name}: expected {n} packed values"):
            cls.unpack(bad)


def test_flags_and_integers_are_checked(ext):
    packed = TokenStatsParams(topk=3).pack()
    flag, integer = list(packed), list(packed)
    flag[TokenStatsParams.names().index("want_kl")] = 0.5
    integer[TokenStatsParams.names().index("topk")] = 2.5
    with pytest.raises(RuntimeError, match=r"TokenStatsParams\.want_kl is a flag: .* got 0\.5"):
        ext.unpack_params("TokenStatsParams", flag)
    with pytest.raises(RuntimeError, match=r"TokenStatsParams\.topk is an integer: .* got 2\.5"):
        ext.unpack_params("TokenStatsParams", integer)
    with pytest.raises(RuntimeError, match="no params struct named 'Nope'"):
        ext.unpack_params("Nope", packed)


def test_every_op_rejects_a_wrong_pack(ext):
    N, H, V, B, T = 3, 4, 7, 2, 3
    h, w, t = torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))
    row, bt, b = torch.zeros(N), torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    short = {cls: _distinct(cls).pack()[:-1] for cls in (TokenStatsParams, GrpoParams, EpilogueParams)}
    calls = [
        (TokenStatsParams, lambda p: ext.token_stats_forward(h, w, None, t, None, None, None, p)),
        (TokenStatsParams, lambda p: ext.token_stats_backward(
            row, None, None, h, w, None, t, None, None, None, row.double(), None, None, None, None, p)),
        (GrpoParams, lambda p: ext.grpo_forward_grad(h, w, None, t, None, row, row, None, None, p)),
        (GrpoParams, lambda p: ext.grpo_dloss_dlogp(row, None, row, row, None, None, p)),
        (EpilogueParams, lambda p: ext.vimpo_epilogue_scan(bt, bt, None, bt, p)),
        (EpilogueParams, lambda p: ext.vimpo_epilogue_tokens(bt, bt, None, None, bt, bt, bt, b, b.new_zeros(3), p)),
    ]
    for cls, call in calls:
        with pytest.raises(RuntimeError, match=rf"{cls.__name__}: expected {len(cls.names())} packed values"):
            call(short[cls])
    # The custom op reads the same pack.
    with pytest.raises(RuntimeError, match=r"TokenStatsParams: expected 9 packed values"):
        torch.ops.vimpo.compiled_token_stats(h, w, None, t, None, None, None, short[TokenStatsParams])


def test_the_epilogue_batch_tensor_is_named_as_in_python(ext):
    """csrc/params.h `EpilogueBatch` and params.py `EPILOGUE_BATCH`: same size, same order (the
    C++ check names its slots in order)."""
    from vimpo_kernels.params import EPILOGUE_BATCH

    bt, b = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    pack = _distinct(EpilogueParams).pack()
    slots = r"\[" + ", ".join(EPILOGUE_BATCH) + r"\]"
    for bad in (b.new_zeros(len(EPILOGUE_BATCH) + 1), b.new_zeros(len(EPILOGUE_BATCH)).float()):
        with pytest.raises(RuntimeError, match=rf"batch must be a contiguous float64 \({len(EPILOGUE_BATCH)},\).*{slots}"):
            ext.vimpo_epilogue_tokens(bt, bt, None, None, bt, bt, bt, b, bad, pack)
