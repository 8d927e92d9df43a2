import torch

from conftest import tiny_llama
from tunesmith.data.tokenize import prompt_ids
from tunesmith.generation import InferenceModel, generate

PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Order 3 red mugs to Oslo."}],
           [{"role": "user", "content": "Hello there, what is the capital of France?"}]]


def one_at_a_time(model, tok, conv, n):
    ids = torch.tensor([prompt_ids(tok, conv)])
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, len(prompt_ids(tok, conv)):], skip_special_tokens=True).strip()


def test_batched_left_padded_generation_matches_unbatched_greedy(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=3).eval()
    im = InferenceModel(model, tiny_tokenizer, "tiny")
    batched = generate(im, PROMPTS, max_new_tokens=12, batch_size=3)
    with torch.no_grad():
        expected = [one_at_a_time(model, tiny_tokenizer, c, 12) for c in PROMPTS]
    assert batched == expected
    assert len(set(batched)) > 1  # the prompts really lead to different continuations
