"""Generation on a real model: sajax (jitted prefill, then a `lax.while_loop` decode over a KV cache) against
transformers' PyTorch `generate` on the same weights, prompts and settings — SmolLM2-135M-Instruct in fp32 on this
machine's CPU, greedy, chat prompts, every row generating exactly `--new-tokens` tokens (no early stop), batch 1 and
batch 16 — and against llama.cpp (llama-cpp-python, batch 1) when it is installed: on an F32 copy of the GGUF
(the weights sajax runs) and on the file as shipped (its own quantized kernels). Every engine uses all CPU cores.

    python bench/generation.py [--model SmolLM2-135M-Instruct] [--new-tokens 64] [--batches 1,16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import gguf as gguf_lib
import numpy as np
import torch
import transformers

from sajax.formats import gguf, known_models, loading, tokenizer
from sajax.infer import generate

QUESTIONS = [
    "Is it acceptable to lie to protect a friend's feelings?", "What should you do if you find a lost wallet?",
    "How can I apologise to a coworker I was rude to?", "Should I tell my friend their partner is cheating?",
    "Is it fair to split a bill evenly when I ate less?", "How do I say no to a favour without hurting someone?",
    "What is a kind way to end a friendship?", "Should children be told about their adoption?",
    "Is it wrong to keep extra change a cashier gave me?", "How can I support a friend who is grieving?",
    "Is it okay to read my teenager's diary?", "What should I do if I see someone being bullied?",
    "Should I report a colleague who takes long lunches?", "Is it rude to wear headphones at a family dinner?",
    "How do I ask a neighbour to be quieter at night?", "Is it ethical to eat meat?",
]


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = known_models.resolve(args.model)
    config, params = loading.load_pretrained(path)
    tok = tokenizer.load_tokenizer(path)
    if gguf.is_gguf(path):  # transformers' own GGUF loading (dequantized to fp32, like sajax's)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name,
                                                                        dtype=torch.float32).eval()
    else:
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count())
    print(f"{args.model}: fp32, greedy, {args.new_tokens} new tokens per row, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5s} {'sajax tok/s':>12s} {'PyTorch tok/s':>14s} {'ratio':>6s}")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tokenizer.encode_chat(tok, q) for q in QUESTIONS[:batch]]

        def sajax_run():
            out = generate.generate(config, params, prompts, max_new_tokens=args.new_tokens, eos_token_id=[],
                                    pad_token_id=tok.pad_token_id)
            assert int(out.lengths.sum()) == batch * args.new_tokens

        width = max(map(len, prompts))  # left padding for PyTorch's batched generate
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def torch_run():
            with torch.no_grad():
                out = torch_model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                           min_new_tokens=args.new_tokens, do_sample=False,
                                           pad_token_id=tok.pad_token_id)
            assert out.shape[1] - width == args.new_tokens

        sajax_run()  # compile
        torch_run()  # warm-up
        sajax_s, torch_s = best_of(args.repeats, sajax_run), best_of(args.repeats, torch_run)
        tokens = batch * args.new_tokens
        print(f"{batch:5d} {tokens / sajax_s:12.1f} {tokens / torch_s:14.1f} {torch_s / sajax_s:6.2f}x")
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not measured (llama-cpp-python is not installed; it builds from its sdist: "
              "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'llama-cpp-python==0.3.36')")
        return
    if not gguf.is_gguf(path):
        print("llama.cpp: not measured (the model is not a GGUF file)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = Path(tmp) / "f32.gguf"
        write_f32_copy(path, f32_path)  # the same weights sajax runs, so llama.cpp does the same fp32 work
        prompt = tokenizer.encode_chat(tok, QUESTIONS[0])
        sajax_tokens = generate.generate(config, params, [prompt], max_new_tokens=args.new_tokens, eos_token_id=[],
                                         pad_token_id=tok.pad_token_id).tokens[0].tolist()
        sajax_one = best_of(args.repeats, lambda: generate.generate(
            config, params, [prompt], max_new_tokens=args.new_tokens, eos_token_id=[], pad_token_id=tok.pad_token_id))
        for label, file in (("F32 (same weights as sajax)", f32_path), (f"{Path(path).name} as shipped", path)):
            llama_s, llama_tokens = llama_cpp_run(llama_cpp, file, prompt, args.new_tokens, args.repeats)
            agree = next((i for i, (a, b) in enumerate(zip(sajax_tokens, llama_tokens)) if a != b), len(llama_tokens))
            print(f"llama.cpp {label}, batch 1: {args.new_tokens / llama_s:.1f} tok/s; sajax fp32 batch 1: "
                  f"{args.new_tokens / sajax_one:.1f} tok/s; ratio {llama_s / sajax_one:.2f}x; greedy tokens equal "
                  f"to sajax's for the first {agree} of {len(llama_tokens)}")


def write_f32_copy(source: Path, out: Path) -> None:
    """`source` with every tensor dequantized to F32 (llama.cpp's layout kept) and its metadata copied."""
    reader = gguf.reader_class()(source)
    arch = reader.fields[gguf_lib.Keys.General.ARCHITECTURE].contents()
    writer = gguf_lib.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf_lib.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf_lib.Keys.General.FILE_TYPE:
            value = int(gguf_lib.LlamaFileType.ALL_F32)
        sub_type = field.types[-1] if field.types[0] == gguf_lib.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type),
                                                  np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_run(llama_cpp, file: Path, prompt: list[int], new_tokens: int, repeats: int):
    """(best wall time, tokens) of llama.cpp generating `new_tokens` greedy tokens after `prompt` (batch 1, every
    core)."""
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    tokens = []

    def run():
        tokens.clear()
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break

    run()  # warm-up
    return best_of(repeats, run), list(tokens)


if __name__ == "__main__":
    main()
