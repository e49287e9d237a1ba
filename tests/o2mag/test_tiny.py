"""The tiny components must keep SD v1.5's structure where the method depends on it."""
import torch

from o2mag.sources import tiny


def _transformer_blocks_in_execution_order(unet):
    blocks = []
    for group in (list(unet.down_blocks), [unet.mid_block], list(unet.up_blocks)):
        for block in group:
            for attn in getattr(block, "attentions", []) or []:
                blocks.extend(attn.transformer_blocks)
    return blocks


def test_unet_has_sd15_block_layout():
    unet = tiny.tiny_unet()
    blocks = _transformer_blocks_in_execution_order(unet)
    assert len(blocks) == 16
    counts = [sum(len(a.transformer_blocks) for a in (getattr(b, "attentions", None) or []))
              for b in unet.down_blocks]
    assert counts == [2, 2, 2, 0]
    assert sum(len(a.transformer_blocks) for a in unet.mid_block.attentions) == 1
    assert [sum(len(a.transformer_blocks) for a in (getattr(b, "attentions", None) or []))
            for b in unet.up_blocks] == [0, 3, 3, 3]
    assert unet.config.cross_attention_dim == tiny.tiny_text_encoder().config.hidden_size
    assert len(unet.attn_processors) == 32
    assert not unet.training and unet.dtype == torch.float32


def test_models_are_seeded():
    a, b, c = tiny.tiny_unet(0), tiny.tiny_unet(0), tiny.tiny_unet(1)
    pa, pb, pc = (next(m.conv_in.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    ta, tb = tiny.tiny_text_encoder(3), tiny.tiny_text_encoder(3)
    assert torch.equal(ta.get_input_embeddings().weight,
                       tb.get_input_embeddings().weight)


def test_tokenizer_and_text_encoder_agree():
    tok, enc = tiny.tiny_tokenizer(), tiny.tiny_text_encoder()
    assert tok.model_max_length == 77
    assert len(tok) == enc.config.vocab_size
    ids = tok(["a photo of a scratch on the metal surface"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    words = tok.convert_ids_to_tokens(ids[0, :11].tolist())
    assert words == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "scratch</w>", "on</w>",
                     "the</w>", "metal</w>", "surface</w>", "<|endoftext|>"]
    assert ids[0, 0] == tok.bos_token_id and enc.config.eos_token_id == tok.eos_token_id
    # unknown words fall back to characters, never to an unknown token
    odd = tok("zqxj").input_ids
    assert len(odd) == 6 and tok.unk_token_id not in odd[1:-1]
    hidden = enc(ids).last_hidden_state
    assert hidden.shape == (1, 77, enc.config.hidden_size) and torch.isfinite(hidden).all()


def test_vae_downsamples_by_eight_and_unet_runs_on_its_latents():
    vae, unet = tiny.tiny_vae(), tiny.tiny_unet()
    img = torch.rand(1, 3, tiny.TINY_IMAGE_SIZE, tiny.TINY_IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(img).latent_dist.mean
        assert lat.shape == (1, 4, tiny.TINY_IMAGE_SIZE // 8, tiny.TINY_IMAGE_SIZE // 8)
        emb = torch.randn(1, 77, unet.config.cross_attention_dim)
        eps = unet(lat, 500, encoder_hidden_states=emb).sample
        assert eps.shape == lat.shape and torch.isfinite(eps).all()
        assert vae.decode(lat).sample.shape == img.shape


def test_scheduler_is_sd15s():
    s = tiny.tiny_scheduler()
    c = s.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012,
                                                                                  "scaled_linear", 1000)
    assert (c.clip_sample, c.set_alpha_to_one, c.steps_offset) == (False, False, 1)
    s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1


def test_components_dict():
    comps = tiny.tiny_components(seed=2)
    assert set(comps) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
