"""Open a moelab LoRA adapter with PEFT on the transformers model of the same checkpoint.

    moelab finetune lora configs/finetune-arith.toml --out runs/ft-lora-example
    python examples/peft_adapter.py runs/demo/model runs/ft-lora-example/adapter

Loads the base checkpoint twice — as moelab's DeepSeekForCausalLM with the adapter applied by moelab,
and as transformers' DeepseekV3ForCausalLM wrapped by ``peft.PeftModel.from_pretrained`` — and prints
the largest logit difference on an arithmetic prompt, then the greedy answer of both.
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import moelab
from moelab.data.sft import ChatFormat
from moelab.data.tokenizer import load_tokenizer
from moelab.infer import generate
from moelab.tune.lora import load_adapter

base, adapter = sys.argv[1], sys.argv[2]
tok = load_tokenizer(base)
prompt = ChatFormat(tok).prompt_ids([{"role": "user", "content": "Calculate 17 + 25."}])
ids = torch.tensor([prompt])

ours = moelab.load(base, dtype=torch.float32)
info = load_adapter(ours, adapter)
peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
with torch.no_grad():
    a, b = ours.eval()(ids).logits, peft_model(ids).logits
print(f"{info.summary}\nmax |logits moelab - logits PEFT| = {(a - b).abs().max().item():.2e}")

answer_ours = generate(ours, ids, 6, eos_token_id=1)[0, len(prompt):]
answer_peft = peft_model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=1)[0, len(prompt):]
print("moelab:", repr(tok.decode(answer_ours.tolist(), skip_special_tokens=True)),
      " PEFT:", repr(tok.decode(answer_peft.tolist(), skip_special_tokens=True)))
