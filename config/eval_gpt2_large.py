# evaluate the pretrained gpt2-large: 774M parameters, n_layer=36, n_head=20, n_embd=1280
exec(open('config/eval_gpt2.py').read())
init_from = 'gpt2-large'
