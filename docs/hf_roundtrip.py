"""Make a small *trained* GPT-2, GPT-NeoX or Llama checkpoint offline, for the `upcycle --from-hf` round trip.

No network: a byte-level BPE (vocab 2048) is learned on the corpus with HF `tokenizers`, a
transformers model of the family (d 128, 4 layers, 4 heads, context 128; NeoX: partial rotary 0.25 and
the parallel residual, as Pythia; Llama: 2 key/value heads, SwiGLU of width 344 ≈ the same FFN
parameters as 4·d) is trained on it with plain AdamW, and both are saved the way `save_pretrained`
writes them. Then:

    python docs/hf_roundtrip.py CORPUS.txt OUT_DIR [steps] [gpt2|gpt_neox|llama]
    monoroute upcycle --from-hf OUT_DIR --data CORPUS.txt --out runs/hf-up
    monoroute eval runs/hf-up/teacher && monoroute eval runs/hf-up

The script prints transformers' own validation loss on the windows `monoroute eval` reads, so the
round trip (transformers' loss = our loss of the converted model) can be checked by eye.
"""
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM)


def build(family: str, vocab: int):
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
            hidden_dropout=0.0, attention_dropout=0.0))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=344, max_position_embeddings=128, bos_token_id=0, eos_token_id=0))
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def main(corpus: str, out: str, steps: int = 600, family: str = "gpt2") -> None:
    from monoroute.data import DataConfig, prepare_data

    text = Path(corpus).read_text(encoding="utf-8", errors="replace")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(text.split("\n%\n"), trainer=trainer)
    tok = GPT2TokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>")
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    # The corpus as monoroute will read it (same split and windows), with this tokenizer.
    store = prepare_data(DataConfig(source=corpus, tokenizer="file", tokenizer_file=str(Path(out) / "tokenizer.json")))
    torch.manual_seed(0)
    model = build(family, hf.get_vocab_size())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(steps):
        x, y = store.batch(step, 16, 128, 0)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0:
            print(f"step {step} train loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    with torch.no_grad():  # the windows `monoroute eval` reads (batch 16, 20 batches)
        losses = [torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
                  for x, y in store.eval_batches(16, 128, 20)]
    model.save_pretrained(out, safe_serialization=True)
    print(json.dumps({"transformers_val_loss": sum(losses) / len(losses), "steps": steps, "family": family,
                      "out": out}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 600,
         sys.argv[4] if len(sys.argv) > 4 else "gpt2")
