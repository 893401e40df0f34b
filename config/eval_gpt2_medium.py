# evaluate the pretrained gpt2-medium (no training: eval_only)
# n_layer=24, n_head=16, n_embd=1024
# 350M parameters
batch_size = 8
eval_iters = 500  # more batches for a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
