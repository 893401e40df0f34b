# evaluate the pretrained gpt2: 124M parameters, n_layer=12, n_head=12, n_embd=768
batch_size = 8
eval_iters = 500  # a better estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
