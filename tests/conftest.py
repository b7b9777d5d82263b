"""Shared test set-up: 8 fake CPU devices (for the sharding tests), fp32 everywhere, tiny reference models, and
one persistent XLA compilation cache for the session (this process and every CLI process the tests start)."""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0 for XLA's CPU code: the same HLO and the same arithmetic (no fast-math at any level), compiled in about
# two thirds of the time (a 3×3 society of the tiny local model: 62 → 42 s); most of the suite's time is compiling
# the tiny models' programs, while the real models' tests run a little slower (test_smollm2 alone: 102 → 111 s).
# Every CLI process a test starts gets it too (`cli_env`). On 2 cores, with the faster GGUF parse
# (`sajax.formats.gguf.reader_class`) and the files longest first: the tests' summed time 1842 → 1511 s, the suite
# 955 → 774 s.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs in separate processes (a run, its killed twin and their resume; a job's
# processes and its one-process reference; the test workers): jax's persistent cache, fresh for each session (so
# every session starts cold and nothing carries over between runs), lets the later ones load what the first
# compiled. The process that makes it (pytest's controller) removes it at the end; the workers inherit it.
if "SAJAX_TEST_JAX_CACHE" not in os.environ:
    os.environ["SAJAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="sajax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["SAJAX_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SAJAX_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sajax.formats import layout  # noqa: E402
from sajax.model.config import ModelConfig  # noqa: E402

torch.set_num_threads(2)


def cli_env(devices: int = 1, without: tuple[str, ...] = ()) -> dict:
    """The environment of a CLI process a test starts: this session's (its compilation cache), with `devices` CPU
    devices (1 is XLA's default) and TEST_XLA_FLAGS, less the variables named in `without`."""
    flags = TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return {**{k: v for k, v in os.environ.items() if k not in without}, "XLA_FLAGS": flags}


def pytest_configure(config):
    # A restore of a damaged checkpoint leaves tensorstore reads in flight that end on orbax's closed event loop;
    # sajax.train.checkpoint drops those reports outside pytest, whose own hook turns them into warnings: ignore them.
    for message in (r"(?s)Exception ignored in.*Event loop is closed",
                    r"Exception ignored in. <coroutine object _read_array_index_and_device_put"):  # . for the colon
        config.addinivalue_line("filterwarnings", f"ignore:{message}:pytest.PytestUnraisableExceptionWarning")


# Seconds each file's tests took under `pytest --durations=0` on 2 cores (two workers, CI's set-up), measured
# 2026-12-07; a file not listed counts as 0. With `--dist loadfile` a worker takes the next file when it is almost
# done, so handing them out longest first (`--no-loadscope-reorder` keeps this order; xdist's own orders them by
# their number of tests) leaves the short files to even out the end instead of one long file running alone.
FILE_SECONDS = {"test_train.py": 343, "test_smollm2.py": 172, "test_qwen.py": 160, "test_multiprocess.py": 153,
                "test_pipeline.py": 145, "test_serve.py": 139, "test_sim_run.py": 118, "test_lora.py": 91,
                "test_packing.py": 68, "test_aot.py": 60, "test_evals.py": 56, "test_generate.py": 52,
                "test_cli.py": 48, "test_gguf.py": 47, "test_losses.py": 39, "test_sim_failures.py": 37,
                "test_families.py": 36, "test_preference.py": 17, "test_sim_openai.py": 12,
                "test_sim_original.py": 11, "test_model.py": 11, "test_sharding.py": 9, "test_launch.py": 9}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's tests keep their order


FAMILY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_reference(seed: int = 0, family: str = "llama", **hf_kwargs):
    """A random transformers causal LM of `family` (norm weights and biases randomised too) and the same model as
    (ModelConfig, params). Weights are large enough (std 0.1) that logits are O(1), so 1e-5 is a real bound."""
    kwargs = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(hf_kwargs)
    config_class, model_class = (getattr(transformers, name) for name in FAMILY_CLASSES[family])
    torch.manual_seed(seed)
    torch_model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    config = ModelConfig.from_hf_dict(torch_model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return torch_model, config, layout.params_from_hf_state(config, state)


def transformers_from_gguf(path):
    """transformers' PyTorch model (fp32, eval) and tokenizer from a GGUF file: its own reading, dequantization and
    q/k permutation, the reference for sajax's.

    transformers parses the file three times (config, weights, tokenizer) with `gguf.GGUFReader`; here that is
    `sajax.formats.gguf.reader_class()`, the same parser over a plain view of the memory map (it overrides only the
    buffer's type): 14 → 4 s a parse for Qwen2.5-0.5B, while what transformers does with the fields is its own."""
    import gguf as gguf_package

    from sajax.formats import gguf as sajax_gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_package, "GGUFReader", sajax_gguf.reader_class())
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                        dtype=torch.float32).eval()
        return torch_model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def torch_logits(torch_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


def right_padded_batch(vocab_size: int, lengths=(24, 17, 9, 1), seed: int = 0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(3, vocab_size, (len(lengths), width)).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


class JsonServer:
    """An HTTP server on 127.0.0.1 (a free port) for JSON: `respond(path, body, headers)` returns (status,
    payload bytes); body is the POSTed JSON, None for a GET. `url` ends in /v1 like an OpenAI-compatible
    server's."""

    def __init__(self, respond):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                status, payload = respond(self.path, body, self.headers)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_GET(self):
                self._answer(None)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def with_overrides(cfg, **overrides):
    """A ConfigDict with dotted-key overrides applied, as `--config.a.b=value` does on the command line."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, fetched once per machine: (GGUF path, config, params, tokenizer), loaded once per
    test session for every test that needs the real model."""
    from sajax.formats import known_models, loading, tokenizer

    path = known_models.fetch("SmolLM2-135M-Instruct")
    config, params = loading.load_pretrained(path)
    return path, config, params, tokenizer.load_tokenizer(path)


@pytest.fixture(scope="session")
def gqa_reference():
    """GQA (4 heads, 2 kv heads), untied, default RoPE: shared by the HF, generation and sharding tests."""
    return make_reference(seed=1)
