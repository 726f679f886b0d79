"""``@triton.jit`` helpers shared by several kernel files: patch addressing in an image, and the
row tile that gathers token rows and adds a position row."""

from ._triton import tl, triton


@triton.jit
def patch_offsets(element, C, H, W, PH: tl.constexpr, PW: tl.constexpr, CHANNEL_LAST: tl.constexpr):
    """Offsets inside one image ``[C, H, W]`` of the pixels ``element`` of a patch at (0, 0),
    in ``(i, j, c)`` order (CHANNEL_LAST, MAE's patchify) or ``(c, i, j)`` (the conv weight's)."""
    if CHANNEL_LAST:
        channel = element % C
        inside = element // C
    else:
        channel = element // (PH * PW)
        inside = element % (PH * PW)
    return channel * H * W + (inside // PW) * W + inside % PW


@triton.jit
def patch_corner(
    token,
    ids_ptr,
    T,
    F,
    H,
    grid_w,
    stride_n,
    stride_f,
    stride_h,
    stride_w,
    U: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    """Offset (int64) in a strided video ``[N, C, F, H, W]`` of the first pixel of row
    ``token`` (= n*T + t)'s patch of ``U x PH x PW`` pixels: patch ``ids[token]`` with HAS_IDS,
    else patch t, numbered ``(t, h, w)`` row-major. Also whether that patch exists: an id
    outside ``[0, L)`` gives offset 0 and False, so callers mask every access through it."""
    image = token // T
    grid_hw = (H // PH) * grid_w
    if HAS_IDS:
        patch = tl.load(ids_ptr + token).to(tl.int64)
        in_range = (patch >= 0) & (patch < (F // U) * grid_hw)
        patch = tl.where(in_range, patch, 0)
    else:
        patch = token % T
        in_range = patch >= 0
    spatial = patch % grid_hw
    corner = image * stride_n + (patch // grid_hw) * U * stride_f
    corner += (spatial // grid_w) * PH * stride_h + (spatial % grid_w) * PW * stride_w
    return corner, in_range


@triton.jit
def row_tile(ROWS, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of an ``[N, ROWS, D]`` output on the grid
    ``(N, cdiv(ROWS, BLOCK_T), cdiv(D, BLOCK_D))``: image (int64), rows, columns, and the
    rows', columns' and tile's validity."""
    image = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = row < ROWS
    col_valid = col < D
    return image, row, row_valid, col, col_valid, row_valid[:, None] & col_valid[None, :]


@triton.jit
def store_rows_plus_positions(
    out_ptr,  # [*, D] out: rows out_rows written
    source_ptr,  # [*, D] rows read where reads_source
    fill_ptr,  # [D] the row written where uses_fill
    pos_ptr,  # [*, D] position rows, added where has_position
    out_rows,
    source_rows,
    reads_source,
    uses_fill,
    pos_rows,
    has_position,
    col,
    col_valid,
    tile,
    D,
):
    """``out[out_rows] = (fill if uses_fill else source[source_rows] if reads_source else 0)
    + (pos[pos_rows] if has_position else 0)``, summed in fp32, stored in out's dtype."""
    tokens = tl.load(
        source_ptr + source_rows[:, None] * D + col[None, :],
        mask=tile & reads_source[:, None],
        other=0.0,
    ).to(tl.float32)
    fill = tl.load(fill_ptr + col, mask=col_valid, other=0.0).to(tl.float32)
    values = tl.where(uses_fill[:, None], fill[None, :], tokens)
    positions = tl.load(
        pos_ptr + pos_rows[:, None] * D + col[None, :],
        mask=tile & has_position[:, None],
        other=0.0,
    )
    values = values + positions.to(tl.float32)
    tl.store(
        out_ptr + out_rows[:, None] * D + col[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=tile,
    )
