"""The tiny model configurations the tests build, one place for all of them.

Tiny so that the Triton interpreter runs a model step in seconds; awkward where that finds
bugs: a non-square image, widths that are not powers of two, one-channel clips.
"""

TINY = dict(
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=24,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
)
# TINY in Hugging Face ViTMAE's names (image and patch sizes are the caller's).
TINY_VITMAE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=48,
)
# A tiny clip for the video MAE: 4 frames of 8 x 8, tubelets of 2 x 4 x 4 (8 tokens).
TINY_CLIP = dict(img_size=8, patch_size=4, num_frames=4, t_patch_size=2, pred_t_dim=2)

# A non-square image (8 x 12, 24 patches of 2 x 2) with norm_pix_loss, for model steps.
TINY_IMAGE = dict(img_size=(8, 12), patch_size=2, in_chans=3, norm_pix_loss=True, **TINY)
# The video models' own widths, smaller still: their clips have more tokens.
TINY_VIDEO = dict(TINY, embed_dim=16, depth=1, decoder_embed_dim=8)
# Hugging Face ViTMAE at 32 px, patches of 8 (16 patches).
TINY_HF = dict(
    image_size=32,
    patch_size=8,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
)
# transformers' VideoMAE: 4 frames of 16 px, 4 px patches (tubelet 2 unless overridden).
TINY_VIDEOMAE = dict(
    image_size=16,
    patch_size=4,
    num_frames=4,
    tubelet_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=48,
)
# What the CUDA tests run: the real 224 px image and patch grid, with two narrow blocks.
SMALL_VIT = dict(
    img_size=224,
    patch_size=16,
    embed_dim=192,
    depth=2,
    num_heads=3,
    decoder_embed_dim=128,
    decoder_depth=1,
    decoder_num_heads=4,
)
# Its video form: mae_st's layout (separable positions, a cls token) on 8 frames of 112 px.
SMALL_VIDEO = dict(
    SMALL_VIT,
    img_size=112,
    num_frames=8,
    t_patch_size=2,
    pred_t_dim=4,
    sep_pos_embed=True,
    cls_embed=True,
)
