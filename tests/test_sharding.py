"""The sharding rule table (llm.sharding): mesh resolution, placements, the config's checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.config import ConfigError, load_config
from llm.sharding import RULES, MeshError, MeshShape, local_shape, param_placements, placement
from llm.spec import ModelSpec, ParamInfo


def test_every_parameter_has_one_known_logical_axis_per_dimension():
    spec = ModelSpec(use_moe=True, use_glu=True, attention_bias=True, mlp_bias=True, position="learned",
                     lm_head_bias=True, num_kv_heads=2)
    for info in spec.param_table():
        assert len(info.axes) == len(info.shape), info
        assert set(info.axes) <= set(RULES), info


@pytest.mark.parametrize(("devices", "fsdp", "tensor", "want"), [
    (8, 1, 1, (8, 1, 1)), (8, -1, 1, (1, 8, 1)), (8, -1, 2, (1, 4, 2)), (8, 2, 2, (2, 2, 2)), (1, -1, 1, (1, 1, 1)),
])
def test_mesh_resolution(devices, fsdp, tensor, want):
    assert MeshShape.resolve(devices, fsdp, tensor).shape == want


@pytest.mark.parametrize(("devices", "fsdp", "tensor", "key"), [
    (8, 1, 3, "distributed.tensor"), (8, 3, 1, "distributed.fsdp"), (8, 4, 4, "distributed.fsdp"),
    (8, 0, 1, "distributed.fsdp"),
])
def test_mesh_that_does_not_divide_the_devices_names_the_key(devices, fsdp, tensor, key):
    with pytest.raises(MeshError) as e:
        MeshShape.resolve(devices, fsdp, tensor)
    assert e.value.key == key and str(devices) in str(e.value)


def test_config_mesh_error_is_a_config_error():
    cfg = load_config("configs/tiny.yaml", ["distributed.fsdp=3"])
    with pytest.raises(ConfigError, match="distributed.fsdp=3"):
        cfg.distributed.mesh(8)


@pytest.mark.parametrize(("override", "key"), [
    ("distributed.tensor=3", "model.num_heads"), ("distributed.fsdp=0", "distributed.fsdp"),
    ("distributed.tensor=0", "distributed.tensor"),
])
def test_config_refuses_degrees_the_model_cannot_take(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])


def test_tensor_degree_must_divide_kv_heads():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config("configs/tiny.yaml", ["model.num_heads=4", "model.num_kv_heads=1", "distributed.tensor=2"])


def test_megatron_column_and_row_layout():
    spec = ModelSpec(num_heads=4, hidden_size=64, use_glu=True)
    where = param_placements(spec, MeshShape(1, 2, 2))
    assert where["layers.0.attn.q_proj.weight"] == ("tensor", "fsdp")  # column: split outputs
    assert where["layers.0.attn.o_proj.weight"] == ("fsdp", "tensor")  # row: split inputs
    assert where["layers.0.mlp.gate_proj.weight"] == ("tensor", "fsdp")
    assert where["layers.0.mlp.down_proj.weight"] == ("fsdp", "tensor")
    assert where["embed.weight"] == ("tensor", "fsdp")
    assert where["final_norm.weight"] == ("fsdp",)
    one = param_placements(spec, MeshShape(4, 1, 1))
    assert all(set(p) == {None} for p in one.values())  # plain data parallel shards nothing


def test_fsdp_falls_back_to_another_dimension_and_never_splits_unevenly():
    info = ParamInfo("x.bias", (6,), "zeros", axes=("heads",))
    assert placement(info, MeshShape(1, 2, 1)) == ("fsdp",)  # no embed dim: FSDP takes dim 0
    assert placement(info, MeshShape(1, 4, 1)) == (None,)  # 6 % 4: stays whole
    assert placement(info, MeshShape(1, 1, 4)) == (None,)
    assert placement(info, MeshShape(1, 2, 3)) == ("tensor",)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (8, 1)]),
       st.booleans(), st.booleans())
def test_placements_divide_the_shapes(layers, degrees, moe, tied):
    fsdp, tensor = degrees
    spec = ModelSpec(num_layers=layers, hidden_size=48, num_heads=4, num_kv_heads=2, vocab_size=50,
                     use_moe=moe, num_experts=3, tie_embeddings=tied, intermediate_size=36)
    mesh = MeshShape(1, fsdp, tensor)
    for info in spec.param_table():
        where = placement(info, mesh)
        shard = local_shape(info.shape, where, mesh)
        for n, local, axis in zip(info.shape, shard, where, strict=True):
            assert local * (mesh.size(axis) if axis else 1) == n
        assert len([a for a in where if a]) == len({a for a in where if a})  # an axis splits one dim
