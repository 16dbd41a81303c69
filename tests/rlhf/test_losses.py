"""jpeft.rlhf.losses against TRL on the same numbers, and plain-JAX properties.

DPO, the reward-model loss and the log-probs call TRL 1.16's own code (``DPOTrainer._compute_loss``
and ``RewardTrainer.compute_loss`` on minimal stand-in trainers, the fused LM head on a tiny GPT-2,
``selective_log_softmax``). TRL 1.16 no longer ships PPO: the PPO checks reproduce, in torch, the
lines of ``trl/experimental/ppo/ppo_trainer.py`` as of TRL 1.9.0 (unchanged up to 1.10.0.dev0).
"""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

from jpeft import rlhf

B, T = 5, 9


def _trl():
    torch = require("torch")
    trl = require("trl")
    return torch, trl


def _np(x):
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(_np(a), _np(b), rtol=tol, atol=tol / 10)


class _Accelerator:
    """What the trainers' loss methods use of ``accelerate.Accelerator`` on one process."""

    def __init__(self, torch):
        self.device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _stand_in_trainer(torch, **attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(torch),
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1, **attrs)


# --- log-probs ---------------------------------------------------------------------------------


@pytest.mark.torch
def test_logprobs_match_trl_fused_head_and_selective_log_softmax():
    torch, trl = _trl()
    transformers = require("transformers")
    from trl.trainer.utils import add_fused_lm_head, selective_log_softmax

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 37, (4, 10))
    # prompt then completion then right padding (completion_mask as TRL's DPO collator builds it)
    prompt, total = [3, 2, 4, 1], [10, 6, 7, 1]
    pos = torch.arange(10)[None]
    attn = (pos < torch.tensor(total)[:, None]).long()
    completion = attn * (pos >= torch.tensor(prompt)[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        add_fused_lm_head(model)
        labels = ids.masked_fill(completion == 0, -100)
        fused = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        fused = fused.log_probs
        gathered = selective_log_softmax(logits[:, :-1], ids[:, 1:])

    lj, ij, cj = jnp.asarray(_np(logits)), jnp.asarray(_np(ids)), jnp.asarray(_np(completion))
    _close(rlhf.token_logprobs(lj, ij), gathered)
    _close(rlhf.token_logprobs(lj, ij, cj), fused)
    _close(rlhf.sequence_logprobs(lj, ij, cj), fused.sum(1))
    # IPO's per-token average (TRL 1.16 divides by completion_mask.sum(dim=1).clamp(min=1))
    _close(rlhf.sequence_logprobs(lj, ij, cj, average=True),
           fused.sum(1) / completion.sum(1).clamp(min=1))
    assert float(rlhf.sequence_logprobs(lj, ij, cj)[3]) == 0.0  # no completion token


def test_token_logprobs_shift_convention():
    # logits at t put all mass on token (t + 1) % V: the next token of 0, 1, 2, ... scores ~0
    v = 6
    tokens = jnp.arange(5)[None] % v
    logits = 50.0 * jax.nn.one_hot((jnp.arange(5) + 1) % v, v)[None]
    lp = rlhf.token_logprobs(logits, tokens)
    assert lp.shape == (1, 4)
    np.testing.assert_allclose(lp, 0.0, atol=1e-6)
    wrong = rlhf.token_logprobs(logits, (tokens + 1) % v)  # scored against the wrong tokens
    assert float(wrong.max()) < -40
    mask = jnp.array([[1, 0, 1, 1, 0]])  # mask[:, 0] is never used
    np.testing.assert_allclose(rlhf.token_logprobs(logits, tokens, mask)[0, [0, 3]], 0.0)


# --- DPO ---------------------------------------------------------------------------------------


def _trl_dpo(torch, trl, per_token, completion, ref_chosen, ref_rejected, beta, loss_type):
    """TRL 1.16's ``DPOTrainer._compute_loss`` with precomputed reference log-probs; the model is a
    stand-in returning ``per_token`` as its fused head's per-token log-probs."""
    trainer = _stand_in_trainer(
        torch, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, args=SimpleNamespace())
    zeros = torch.zeros_like(per_token)

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros_like(completion),
              "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.torch
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl_loss_rewards_and_gradient(loss_type):
    torch, trl = _trl()
    beta = 0.1 if loss_type == "sigmoid" else 0.5
    g = torch.Generator().manual_seed(1)
    # rows 0..B-1 chosen, B..2B-1 rejected (TRL's concatenated batch); completions of varied lengths
    lengths = torch.tensor([1, 3, 8, 5, 2, 4, 8, 1, 6, 3])
    pos = torch.arange(T)[None]
    completion = ((pos >= 1) & (pos <= lengths[:, None])).long()
    per_token = (-3 * torch.rand(2 * B, T - 1, generator=g)) * completion[:, 1:]
    ref = (-3 * torch.rand(2 * B, T - 1, generator=g)) * completion[:, 1:]
    ref_c, ref_r = ref.sum(1).chunk(2)

    per_example = []
    for i in range(B):  # TRL returns the batch mean: one call per pair for the per-pair losses
        rows = [i, B + i]
        loss_i, _ = _trl_dpo(torch, trl, per_token[rows], completion[rows], ref_c[i:i + 1],
                             ref_r[i:i + 1], beta, loss_type)
        per_example.append(loss_i)
    leaf = per_token.clone().requires_grad_(True)
    loss, metrics = _trl_dpo(torch, trl, leaf, completion, ref_c, ref_r, beta, loss_type)
    loss.backward()

    pc, pr = (jnp.asarray(_np(x)) for x in per_token.sum(1).chunk(2))
    rc, rr = jnp.asarray(_np(ref_c)), jnp.asarray(_np(ref_r))
    n_c, n_r = (jnp.asarray(_np(x), jnp.float32) for x in completion.sum(1).chunk(2))

    def ours(pc, pr):
        if loss_type == "ipo":  # the caller length-normalises (sequence_logprobs(average=True))
            return rlhf.dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=beta,
                                 loss_type="ipo")
        return rlhf.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")

    losses, chosen_rewards, rejected_rewards = ours(pc, pr)
    _close(losses, torch.stack(per_example))
    _close(losses.mean(), loss.detach())
    if loss_type == "sigmoid":  # TRL 1.16 logs the rewards of the token sums (IPO: see dpo_loss)
        _close(chosen_rewards.mean(), metrics["rewards/chosen"][0])
        _close(rejected_rewards.mean(), metrics["rewards/rejected"][0])
        _close((chosen_rewards - rejected_rewards).mean(), metrics["rewards/margins"][0])
    # d loss / d (sequence log-prob) = the gradient on any of its per-token log-probs in TRL
    gc, gr = jax.grad(lambda a, b: ours(a, b)[0].mean(), argnums=(0, 1))(pc, pr)
    _close(jnp.concatenate([gc, gr]), leaf.grad[:, 0])
    _close(leaf.grad, leaf.grad[:, :1].expand_as(leaf.grad))  # the same on every token


@pytest.mark.torch
def test_dpo_label_smoothing_matches_trl_conservative_dpo():
    torch, _ = _trl()
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-10 * torch.rand(B, generator=g) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta, eps = 0.2, 0.1
    # TRL 0.28.0, trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss, loss_type "sigmoid" (TRL 1.x
    # dropped label smoothing from "sigmoid"; at eps = 0 the two agree, tested above)
    logits = (pc - pr) - (rc - rr)
    t_losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - eps)
                - torch.nn.functional.logsigmoid(-beta * logits) * eps)
    t_losses.mean().backward()

    args = [jnp.asarray(_np(x)) for x in (pc, pr, rc, rr)]
    losses, chosen_rewards, _ = rlhf.dpo_loss(*args, beta=beta, label_smoothing=eps)
    _close(losses, t_losses)
    _close(chosen_rewards, beta * (pc - rc))
    grads = jax.grad(lambda a, b: rlhf.dpo_loss(a, b, *args[2:], beta=beta,
                                                label_smoothing=eps)[0].mean(),
                     argnums=(0, 1))(*args[:2])
    _close(grads[0], pc.grad)
    _close(grads[1], pr.grad)


# --- reward model ------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_reward_pair_loss_matches_trl(with_margin, center):
    torch, trl = _trl()
    g = torch.Generator().manual_seed(3)
    scores = 2 * torch.randn(2 * B, 1, generator=g)
    margin = torch.rand(B, generator=g)
    trainer = _stand_in_trainer(torch, args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"attention_mask": torch.ones(2 * B, T, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin

    def model(**kwargs):
        return SimpleNamespace(logits=scores)

    expected = trl.RewardTrainer.compute_loss(trainer, model, inputs)
    chosen, rejected = (jnp.asarray(_np(x)) for x in scores.squeeze(-1).chunk(2))
    got = rlhf.reward_pair_loss(chosen, rejected, jnp.asarray(_np(margin)) if with_margin else None,
                                center_rewards_coefficient=center)
    _close(got, expected)


# --- PPO against TRL's PPOTrainer (reproduced: TRL 1.16 has no PPO) --------------------------


def _trl_ppo(torch, seq_len, scores, logprobs, ref_logprobs, values, new_logprobs, vpred,
             kl_estimator, whiten_rewards, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2,
             cliprange_value=0.2, vf_coef=0.1):
    """The PPO math of TRL 1.9.0's ``trl/experimental/ppo/ppo_trainer.py``, reproduced in torch:
    the module-level ``masked_mean`` / ``masked_var`` / ``masked_whiten`` and, in
    ``PPOTrainer.train``, the padding masks, steps 4 (rewards), 5 (whiten rewards) and 6 (GAE),
    and the minibatch losses (one minibatch holding the whole batch)."""
    invalid_logprob = 1.0  # INVALID_LOGPROB

    def masked_mean(x, mask):
        return (x * mask).sum() / mask.sum()

    def masked_whiten(x, mask, shift_mean=True):
        mean = masked_mean(x, mask)
        n = mask.sum()
        var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1))
        out = (x - mean) * torch.rsqrt(var + 1e-8)
        return out + mean if not shift_mean else out

    b, t = logprobs.shape
    idx = torch.arange(t).repeat(b, 1)
    padding_mask = idx > seq_len[:, None]
    logprobs = logprobs.masked_fill(padding_mask, invalid_logprob)
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, invalid_logprob)
    seq_len_p1 = seq_len + 1
    padding_mask_p1 = idx > seq_len_p1[:, None]
    values = values.masked_fill(padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = (-kl_coef * kl).clone()
    end = torch.where(seq_len_p1 < t, seq_len_p1, seq_len)
    rewards[torch.arange(b), end] += scores
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = rewards.masked_fill(padding_mask_p1, 0)

    lastgaelam, reversed_adv = 0, []
    for i in reversed(range(t)):
        nextvalues = values[:, i + 1] if i < t - 1 else 0.0
        delta = rewards[:, i] + gamma * nextvalues - values[:, i]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], 1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0)

    new_logprobs = new_logprobs.masked_fill(padding_mask, invalid_logprob)
    vpred = vpred.masked_fill(padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(rewards=rewards, advantages=advantages, returns=returns, vf_loss=vf_loss,
                vf_clipfrac=vf_clipfrac, pg_loss=pg_loss, pg_clipfrac=pg_clipfrac,
                approxkl=approxkl, loss=pg_loss + vf_coef * vf_loss)


@pytest.mark.torch
@pytest.mark.parametrize("kl_estimator,whiten_rewards", [("k1", False), ("k3", True)])
def test_ppo_pipeline_matches_trl(kl_estimator, whiten_rewards):
    torch, _ = _trl()
    g = torch.Generator().manual_seed(4)
    # TRL's sequence_length: index of the last real token (-1: empty response; T-1: no padding)
    seq_len = torch.tensor([2, T - 1, 5, -1, 0])
    scores = torch.randn(B, generator=g)
    logprobs = -2 * torch.rand(B, T, generator=g)
    ref_logprobs = logprobs + 0.3 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    new_logprobs = (logprobs + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    vpred = (values + 0.4 * torch.randn(B, T, generator=g)).requires_grad_(True)
    ref = _trl_ppo(torch, seq_len, scores, logprobs, ref_logprobs, values, new_logprobs, vpred,
                   kl_estimator, whiten_rewards)
    ref["loss"].backward()

    mask = jnp.arange(T)[None] <= jnp.asarray(_np(seq_len))[:, None]  # TRL's ~padding_mask
    value_mask = rlhf.extend_mask(mask)  # TRL's ~padding_mask_p1
    np.testing.assert_array_equal(value_mask, jnp.arange(T)[None] <= jnp.asarray(
        _np(seq_len + 1))[:, None])
    # our inputs keep junk on the padding (TRL overwrites it): the masks must make it irrelevant
    j = {k: jnp.asarray(_np(v)) for k, v in dict(
        scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
        new_logprobs=new_logprobs, vpred=vpred).items()}

    rewards = rlhf.kl_penalized_rewards(j["scores"], j["logprobs"], j["ref_logprobs"], mask,
                                        0.05, kl_estimator, score_at="after_last")
    if whiten_rewards:
        rewards = rlhf.whiten(rewards, value_mask, shift_mean=False)
    _close(rewards, ref["rewards"])
    advantages, returns = rlhf.gae(rewards, j["values"], value_mask, gamma=1.0, lam=0.95)
    _close(returns, ref["returns"])
    advantages = rlhf.whiten(advantages, mask)
    _close(advantages, ref["advantages"])

    def losses(new_logprobs, vpred):
        pg = rlhf.ppo_policy_loss(new_logprobs, j["logprobs"], advantages, mask, 0.2)
        vf = rlhf.ppo_value_loss(vpred, j["values"], returns, value_mask, 0.2)
        return pg[0] + 0.1 * vf[0], (pg, vf)

    (loss, (pg, vf)), grads = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)(
        j["new_logprobs"], j["vpred"])
    _close(pg[0], ref["pg_loss"])
    _close(pg[1], ref["pg_clipfrac"])
    _close(vf[0], ref["vf_loss"])
    _close(vf[1], ref["vf_clipfrac"])
    assert 0 < float(pg[1]) < 1 and 0 < float(vf[1]) < 1  # both sides of the clip are exercised
    # approx_kl averages over the mask; TRL's over all B*T positions (0 on its padding)
    _close(pg[2] * mask.sum() / (B * T), ref["approxkl"])
    _close(loss, ref["loss"])
    _close(grads[0], new_logprobs.grad)
    _close(grads[1], vpred.grad)


def test_score_at_last_real_token():
    # score_at="last" (the default): the score on the last masked token, nothing past it
    scores = jnp.array([1.0, 2.0, 3.0])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    zeros = jnp.zeros((3, 4))
    r = rlhf.kl_penalized_rewards(scores, zeros, zeros, mask, 0.1)
    np.testing.assert_array_equal(r, [[0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]])
    r = rlhf.kl_penalized_rewards(scores, zeros, zeros, mask, 0.1, score_at="after_last")
    np.testing.assert_array_equal(r, [[0, 0, 1, 0], [0, 0, 0, 2], [3, 0, 0, 0]])


# --- plain JAX ---------------------------------------------------------------------------------


def _random_ppo_batch(seed, b=B, t=T):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    mask = np.arange(t)[None] < lengths[:, None]
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return mask, lengths, f


def test_gae_matches_python_loop():
    mask, lengths, f = _random_ppo_batch(5)
    rewards, values = f(B, T), f(B, T)
    gamma, lam = 0.9, 0.8
    adv, ret = rlhf.gae(rewards, values, mask, gamma, lam)
    want = np.zeros((B, T), np.float32)
    for b in range(B):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b, t + 1] if t + 1 < lengths[b] else 0.0
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            want[b, t] = running
    _close(adv, want)
    _close(ret, np.where(mask, want + values, 0))


def test_whiten_mean_zero_var_one_over_mask():
    mask, _, f = _random_ppo_batch(6)
    x = 3 + 5 * f(B, T)
    w = np.asarray(rlhf.whiten(x, mask))
    assert (w[~mask] == 0).all()
    sel = w[mask]
    np.testing.assert_allclose(sel.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(sel.var(ddof=1), 1, atol=1e-4)  # TRL's unbiased variance
    kept = np.asarray(rlhf.whiten(x, mask, shift_mean=False))[mask]
    np.testing.assert_allclose(kept.mean(), x[mask].mean(), rtol=1e-5)


def test_padding_never_changes_results():
    mask, _, f = _random_ppo_batch(7)
    arrays = {k: f(B, T) for k in ("logprobs", "ref", "values", "old_values", "new_logprobs",
                                   "rewards", "adv")}
    scores = f(B)
    pad = 4

    def padded(x):  # junk, inf and NaN in the padding
        junk = np.full((B, pad), np.nan, np.float32)
        junk[:, 1] = np.inf
        junk[:, 2] = -1e30
        return np.concatenate([x, junk], axis=1)

    pmask = np.concatenate([mask, np.zeros((B, pad), bool)], axis=1)

    def run(a, m, cut):
        rew = rlhf.kl_penalized_rewards(scores, a["logprobs"], a["ref"], m, 0.1, "k3")
        adv, ret = rlhf.gae(a["rewards"], a["values"], m, 0.99, 0.95)
        pg = rlhf.ppo_policy_loss(a["new_logprobs"], a["logprobs"], a["adv"], m, 0.2)
        vf = rlhf.ppo_value_loss(a["values"], a["old_values"], a["rewards"], m, 0.2)
        grad = jax.grad(lambda lp, v: rlhf.ppo_policy_loss(lp, a["logprobs"], a["adv"], m)[0]
                        + rlhf.ppo_value_loss(v, a["old_values"], a["rewards"], m)[0],
                        argnums=(0, 1))(a["new_logprobs"], a["values"])
        return dict(rew=rew[:, :cut], adv=adv[:, :cut], ret=ret[:, :cut],
                    white=rlhf.whiten(a["adv"], m)[:, :cut], pg=jnp.stack(pg), vf=jnp.stack(vf),
                    mean=rlhf.masked_mean(a["values"], m), g0=grad[0][:, :cut],
                    g1=grad[1][:, :cut], g_pad=jnp.stack([grad[0][:, cut:], grad[1][:, cut:]]))

    base = run(arrays, mask, T)
    more = run({k: padded(v) for k, v in arrays.items()}, pmask, T)
    for k in base:
        if k != "g_pad":
            _close(more[k], base[k], tol=1e-6)
    np.testing.assert_array_equal(more["g_pad"], 0)


def test_jit_matches_eager():
    mask, _, f = _random_ppo_batch(8)
    x, y, z = f(B, T), f(B, T), f(B, T)
    cases = [
        (lambda: rlhf.dpo_loss(x[:, 0], x[:, 1], y[:, 0], y[:, 1], beta=0.3, loss_type="ipo"),
         jax.jit(lambda a, b, beta: rlhf.dpo_loss(a[:, 0], a[:, 1], b[:, 0], b[:, 1], beta=beta,
                                                  loss_type="ipo"))(x, y, 0.3)),
        (lambda: rlhf.reward_pair_loss(x[:, 0], y[:, 0], z[:, 0]),
         jax.jit(rlhf.reward_pair_loss)(x[:, 0], y[:, 0], z[:, 0])),
        (lambda: rlhf.kl_penalized_rewards(z[:, 0], x, y, mask, 0.1, "k3"),
         jax.jit(rlhf.kl_penalized_rewards, static_argnames=("kl_estimator", "score_at"))(
             z[:, 0], x, y, mask, 0.1, kl_estimator="k3")),
        (lambda: rlhf.gae(x, y, mask, 0.99, 0.9), jax.jit(rlhf.gae)(x, y, mask, 0.99, 0.9)),
        (lambda: rlhf.whiten(x, mask), jax.jit(rlhf.whiten, static_argnums=2)(x, mask, True)),
        (lambda: rlhf.ppo_policy_loss(x, y, z, mask, 0.2),
         jax.jit(rlhf.ppo_policy_loss)(x, y, z, mask, 0.2)),
        (lambda: rlhf.ppo_value_loss(x, y, z, mask, 0.2),
         jax.jit(rlhf.ppo_value_loss)(x, y, z, mask, 0.2)),
        (lambda: rlhf.sequence_logprobs(x[..., None] * y[:, :, None], (mask * 0), mask),
         jax.jit(rlhf.sequence_logprobs)(x[..., None] * y[:, :, None], (mask * 0), mask)),
    ]
    for eager, jitted in cases:
        for a, b in zip(jax.tree.leaves(eager()), jax.tree.leaves(jitted)):
            _close(b, a, tol=1e-6)


def test_argument_errors():
    v = jnp.zeros(3)
    m = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="unknown loss_type 'hinge'"):
        rlhf.dpo_loss(v, v, v, v, loss_type="hinge")
    with pytest.raises(ValueError, match="beta must lie in"):
        rlhf.dpo_loss(v, v, v, v, beta=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        rlhf.dpo_loss(v, v, v, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\[B\]"):
        rlhf.dpo_loss(m, m, m, m)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        rlhf.dpo_loss(v, v, v, v, label_smoothing=0.5)
    with pytest.raises(ValueError, match="must be 0 for 'ipo'"):
        rlhf.dpo_loss(v, v, v, v, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        rlhf.reward_pair_loss(v, jnp.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        rlhf.reward_pair_loss(v, v, margin=jnp.zeros(2))
    with pytest.raises(ValueError, match="unknown kl_estimator 'k2'"):
        rlhf.kl_penalized_rewards(v, m, m, m, 0.1, "k2")
    with pytest.raises(ValueError, match="unknown score_at"):
        rlhf.kl_penalized_rewards(v, m, m, m, 0.1, score_at="first")
    with pytest.raises(ValueError, match="scores"):
        rlhf.kl_penalized_rewards(jnp.zeros(4), m, m, m, 0.1)
    with pytest.raises(ValueError, match="gamma must lie in"):
        rlhf.gae(m, m, m, gamma=1.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        rlhf.gae(m, m, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="clip_range must lie in"):
        rlhf.ppo_policy_loss(m, m, m, m, clip_range=0.0)
    with pytest.raises(ValueError, match="clip_range_value must lie in"):
        rlhf.ppo_value_loss(m, m, m, m, clip_range_value=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        rlhf.token_logprobs(jnp.zeros((3, 4, 5)), jnp.zeros((3, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        rlhf.sequence_logprobs(m, m, m)
