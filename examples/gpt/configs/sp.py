# Sequence parallelism over 4 processes ("sp" axis): every activation [B, S, C] is split on S,
# weights are replicated, attention is ring attention (mode="all_to_all" for Ulysses).
# Data size inferred (1 on 4 processes). Ring/all-to-all attention has no dropout: keep dropout=0.
parallel = dict(pipeline=1, sequence=dict(size=4, mode="ring"))
zero = dict(stage=0)
precision = "fp32"
gradient_accumulation = 1
clip_grad_norm = 1.0
model = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
train = dict(batch_size=16, steps=200, warmup=10)
optimizer = dict(lr=3e-3)
checkpoint = dict(every=100)
log = dict(every=20)
