# Pipeline parallelism: 2 stages x 2 data replicas = 4 processes (axes "pipe", "data").
# The GPT is split into blocks (embedding, 4 transformer layers, final norm + LM head) and
# partitioned into 2 stages; each step runs 4 micro-batches of the per-replica batch with 1F1B.
# Interleaved 1F1B instead: pipeline_schedule = dict(schedule="interleaved", chunks=2, num_microbatches=4).
# Tensor parallelism inside stages: add tensor=dict(size=2, mode="1d") (8 processes with data=2).
# The pipeline blocks have no dropout: keep dropout=0.
parallel = dict(pipeline=2, data=2, tensor=None)
pipeline_schedule = dict(schedule="1f1b", num_microbatches=4, partition="parameters")
zero = dict(stage=1)
precision = "fp32"
gradient_accumulation = 1
clip_grad_norm = 1.0
model = dict(block_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.0)
train = dict(batch_size=16, steps=200, warmup=10)
optimizer = dict(lr=3e-3)
checkpoint = dict(every=100)
log = dict(every=20)
