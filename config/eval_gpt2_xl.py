# evaluate the pretrained gpt2-xl: 1558M parameters, n_layer=48, n_head=25, n_embd=1600
exec(open('config/eval_gpt2.py').read())
init_from = 'gpt2-xl'
