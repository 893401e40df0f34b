# evaluate the pretrained gpt2 (no training: eval_only)
# n_layer=12, n_head=12, n_embd=768
# 124M parameters
batch_size = 8
eval_iters = 500  # more batches for a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
