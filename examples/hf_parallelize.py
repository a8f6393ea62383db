"""Hugging Face GPT-2 and Llama (tiny configs, random weights, no download) parallelized from outside.

    torchrun --nproc-per-node 4 examples/hf_parallelize.py --model hf_gpt2 --mode 1d
    torchrun --nproc-per-node 4 examples/hf_parallelize.py --model hf_llama --mode sp
    torchrun --nproc-per-node 4 examples/hf_parallelize.py --model hf_gpt2 --mode sp   # Conv1D blockwise

The HF code is unmodified. Recipe: ``use_cache=False`` (the KV cache concatenates into an empty
tensor), attention ``"sdpa"``, and the loss computed outside the model from ``.logits`` (HF's loss
pads the labels, an op not sharded yet). Weights round-trip through dense safetensors
(``load_dense`` reads only each rank's blocks; ``save_dense`` writes the dense file on rank 0).
Needs ``pip install meshpar[hf]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import meshpar as mp
from meshpar import P
from meshpar.models.plans import parallel_plan, place_batch

MESHES = {"1d": ((2, 2), ("data", "tp")), "2d": ((2, 2), ("x", "y")), "sp": ((2, 2), ("data", "sp"))}


def build(name: str) -> torch.nn.Module:
    if name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      use_cache=False, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["hf_gpt2", "hf_llama"], default="hf_gpt2")
    ap.add_argument("--mode", choices=sorted(MESHES), default="1d")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    shape, names = MESHES[args.mode]
    mesh = mp.Mesh(shape, names)
    data = ("data",) if "data" in names else ()

    model = build(args.model).double().eval()
    dense = copy.deepcopy(model)
    mp.parallelize(model, mesh, parallel_plan(args.model, args.mode, data=data))   # the two lines

    # weights: dense safetensors in, each rank reading its blocks; dense safetensors out
    path = os.path.join(tempfile.gettempdir(), f"meshpar_{args.model}.safetensors")
    mp.save_dense(model, path)
    dist.barrier()
    mp.load_dense(model, path)

    nd, d = (mesh.size("data"), mesh.coord("data")) if data else (1, 0)
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    tg = torch.roll(idx, -1, 1)
    logits = model(idx.chunk(nd)[d]).logits                      # each data rank's local batch
    tg_l = place_batch(tg.chunk(nd)[d], P(logits.spec[0], logits.spec[1] if len(logits.spec) > 1 else None),
                       mesh, data)
    loss = mp.unshard(F.cross_entropy(logits.reshape(-1, 64), tg_l.reshape(-1)))
    ref = F.cross_entropy(dense(idx).logits.reshape(-1, 64), tg.reshape(-1))
    if dist.get_rank() == 0:
        print(f"{args.model} {args.mode}: loss {float(loss.detach()):.10f}, dense {float(ref.detach()):.10f}")
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-9 * abs(float(ref.detach()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
