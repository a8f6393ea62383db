# 3D tensor parallelism on a 2x2x2 cube of 8 processes (axes "i", "j", "k").
parallel = dict(data=1, pipeline=1, tensor=dict(size=8, mode="3d"))
zero = dict(stage=0)
precision = "fp32"
gradient_accumulation = 1
clip_grad_norm = 1.0
model = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
train = dict(batch_size=16, steps=200, warmup=10)
optimizer = dict(lr=3e-3)
checkpoint = dict(every=100)
log = dict(every=20)
