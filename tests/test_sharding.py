"""Mesh sharding on 8 fake CPU devices (data=2, fsdp=2, tensor=2) against one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_reference, right_padded_batch
from sajax.model import decoder
from sajax.parallel import sharding


@pytest.fixture(scope="module")
def reference():
    # vocab and widths divisible by the tensor/fsdp axes
    return make_reference(seed=4, vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2)


def _loss(config, params, ids, mask):
    """Mean next-token cross-entropy over real tokens."""
    logits = decoder.forward(config, params, ids, mask)
    logprobs = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:] * mask[:, :-1]
    return jnp.sum(nll * weights) / jnp.sum(weights)


def _run_on(mesh, config, params, ids, mask):
    """Forward logits and the loss's gradients, jitted with explicit in/out shardings on `mesh`."""
    param_sh = decoder.param_shardings(config, mesh)
    batch_sh = sharding.batch_sharding(mesh, 2)
    params = jax.device_put(params, param_sh)
    ids, mask = jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh)
    with sharding.activation_rules(mesh):
        logits = jax.jit(functools.partial(decoder.forward, config), in_shardings=(param_sh, batch_sh, batch_sh),
                         out_shardings=sharding.batch_sharding(mesh, 3))(params, ids, mask)
        grads = jax.jit(jax.grad(functools.partial(_loss, config)), in_shardings=(param_sh, batch_sh, batch_sh),
                        out_shardings=param_sh)(params, ids, mask)
    return logits, grads


def test_eight_devices_match_one_device(reference):
    assert len(jax.devices()) == 8
    _, config, params = reference
    ids, mask = right_padded_batch(config.vocab_size, lengths=(16, 11, 5, 16, 2, 9, 13, 7))
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    logits_1, grads_1 = _run_on(one, config, params, ids, mask)
    logits_8, grads_8 = _run_on(eight, config, params, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits_8) - np.asarray(logits_1))[valid].max() <= 1e-5
    scale = jax.tree.map(lambda g: float(np.abs(np.asarray(g)).max()), grads_1)
    assert min(jax.tree.leaves(scale)) > 1e-4  # every parameter has a gradient worth comparing
    diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), grads_8, grads_1)
    assert max(jax.tree.leaves(diffs)) <= 1e-6 * max(jax.tree.leaves(scale))

    # the gradients (out_shardings: the parameters' shardings) are laid out as the rules say
    attn = grads_8["layers_0"]["self_attn"]
    assert attn["q_proj"].sharding.spec == P("fsdp", "tensor", None)
    assert attn["q_proj"].addressable_shards[0].data.shape == (32, 2, 16)  # [D/fsdp, H/tensor, E]
    assert attn["o_proj"].sharding.spec == P("tensor", None, "fsdp")
    assert grads_8["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert grads_8["embed_tokens"].addressable_shards[0].data.shape == (64, 32)
    assert grads_8["lm_head"].sharding.spec == P("fsdp", "tensor")
    assert grads_8["layers_1"]["mlp"]["down_proj"].sharding.spec == P("tensor", "fsdp")
    assert grads_8["norm"]["weight"].sharding.spec == P(None)
    assert logits_8.sharding.spec == P(("data", "fsdp"), None, None)


def test_scanned_layers_shard_with_a_replicated_layer_axis(reference):
    _, config, _ = reference
    scanned = config.replace(scan_layers=True)
    shardings = decoder.param_shardings(scanned, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    assert shardings["layers"]["mlp"]["gate_proj"].spec == P(None, "fsdp", "tensor")


def _sharded_opt_state(tx, config, params):
    """(param shardings, optimizer-state shardings, the state initialised with them) on a (2, 2, 2) mesh."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    param_sh = decoder.param_shardings(config, mesh)
    state_sh = sharding.opt_state_shardings(tx, decoder.param_shapes(config), param_sh, mesh)
    return param_sh, state_sh, jax.jit(tx.init, out_shardings=state_sh)(jax.device_put(params, param_sh))


def test_optimizer_state_follows_param_shardings(reference):
    _, config, params = reference
    param_sh, state_sh, state = _sharded_opt_state(optax.adamw(1e-3), config, params)
    adam = state_sh[0]
    assert adam.mu["layers_0"]["self_attn"]["k_proj"].spec == P("fsdp", "tensor", None)
    assert adam.nu == param_sh
    assert adam.count.spec == P()
    assert state[0].mu["lm_head"].sharding.spec == P("fsdp", "tensor")


def test_make_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 12 devices, 8 are available"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.make_mesh(data=-1, tensor=3)


def test_indivisible_parameter_is_named(gqa_reference):
    _, config, _ = gqa_reference  # vocab 101
    with pytest.raises(ValueError, match=r"parameter embed_tokens dim 0 has size 101, not divisible"):
        decoder.param_shardings(config, sharding.make_mesh(data=2, fsdp=2, tensor=2))


def test_factored_optimizer_state_is_replicated_where_shapes_differ(reference):
    _, config, params = reference
    _, _, state = _sharded_opt_state(optax.adafactor(1e-3), config, params)
    param_shapes = {x.shape for x in jax.tree.leaves(params)}
    leaves = jax.tree.leaves(state)
    assert any(leaf.shape not in param_shapes and leaf.ndim >= 1 for leaf in leaves)  # factored statistics exist
    for leaf in leaves:
        if any(axis is not None for axis in leaf.sharding.spec):
            assert leaf.shape in param_shapes  # only full-shape state follows its parameter's sharding


def test_make_mesh_keeps_the_given_device_order():
    devices = list(reversed(jax.devices()))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]
