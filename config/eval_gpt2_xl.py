# evaluate the pretrained gpt2-xl (no training: eval_only)
# n_layer=48, n_head=25, n_embd=1600
# 1558M parameters
batch_size = 8
eval_iters = 500  # more batches for a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-xl'
