# evaluate the pretrained gpt2-large (no training: eval_only)
# n_layer=36, n_head=20, n_embd=1280
# 774M parameters
batch_size = 8
eval_iters = 500  # more batches for a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
