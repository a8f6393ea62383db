# The main job: SUMMA 2D tensor parallelism on a 2x2 grid of 4 processes (axes "x", "y").
parallel = dict(data=1, pipeline=1, tensor=dict(size=4, mode="2d"), sequence=dict(size=1, mode="ring"))
zero = dict(stage=0)
precision = "fp32"
gradient_accumulation = 1
clip_grad_norm = 1.0
model = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
train = dict(batch_size=16, steps=200, warmup=10)
optimizer = dict(lr=3e-3)
checkpoint = dict(every=100)
log = dict(every=20)
