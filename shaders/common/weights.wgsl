// Weight element access for the four storage types; layout in crate/src/quant.rs.
// Exactly one of W_F32, W_F16, W_Q8_0, W_Q4_0 is defined (W_QUANT with the last two).
// The including shader declares the buffers:
//   W_F32:               var<storage, read> w: array<f32>;        // (rows, cols)
//   W_F16, W_Q8_0, W_Q4_0: var<storage, read> w: array<u32>;      // packed words
//   W_QUANT:             var<storage, read> w_scales: array<u32>; // f16 pairs, one per block

#ifdef W_QUANT
// Scale of block `b` (blocks of 32 values, numbered row-major over padded rows).
fn w_scale(b: u32) -> f32 {
    let pair = unpack2x16float(w_scales[b >> 1u]);
    return select(pair.x, pair.y, (b & 1u) == 1u);
}

// Row length rounded up to whole blocks.
fn w_padded(cols: u32) -> u32 {
    return (cols + 31u) & ~31u;
}
#endif

// Element (row, col) of a weight matrix with `cols` values per row.
fn w_at(row: u32, col: u32, cols: u32) -> f32 {
#ifdef W_F32
    return w[row * cols + col];
#endif
#ifdef W_F16
    let e = row * cols + col;
    let pair = unpack2x16float(w[e >> 1u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
#endif
#ifdef W_Q8_0
    let e = row * w_padded(cols) + col;
    let q = extractBits(i32(w[e >> 2u]), 8u * (e & 3u), 8u);
    return f32(q) * w_scale(e >> 5u);
#endif
#ifdef W_Q4_0
    let e = row * w_padded(cols) + col;
    let q = extractBits(w[e >> 3u], 4u * (e & 7u), 4u);
    return (f32(q) - 8.0) * w_scale(e >> 5u);
#endif
}

// Weight values (row, col .. col+3) of a matrix with `cols` values per row; 0 past the row's
// end. `col` is a multiple of 4, so a q8_0 chunk is one whole word, a q4_0 chunk half a word
// and both lie in one scale block.
fn w_at4(row: u32, col: u32, cols: u32) -> vec4<f32> {
    if (col + 4u > cols) {
        var v = vec4<f32>(0.0);
        for (var j = 0u; j < 4u; j++) {
            if (col + j < cols) {
                v[j] = w_at(row, col + j, cols);
            }
        }
        return v;
    }
#ifdef W_F32
    let e = row * cols + col;
    return vec4<f32>(w[e], w[e + 1u], w[e + 2u], w[e + 3u]);
#endif
#ifdef W_F16
    let e = row * cols + col;
    if ((e & 1u) == 1u) {
        // Odd row length: the chunk straddles words.
        return vec4<f32>(w_at(row, col, cols), w_at(row, col + 1u, cols),
                         w_at(row, col + 2u, cols), w_at(row, col + 3u, cols));
    }
    return vec4<f32>(unpack2x16float(w[e >> 1u]), unpack2x16float(w[(e >> 1u) + 1u]));
#endif
#ifdef W_Q8_0
    let e = row * w_padded(cols) + col;
    let q = vec4<i32>(bitcast<i32>(w[e >> 2u]));
    // Sign-extend each byte: move it to the top, then shift back arithmetically.
    let s = (q << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
    return vec4<f32>(s) * w_scale(e >> 5u);
#endif
#ifdef W_Q4_0
    let e = row * w_padded(cols) + col;
    let h = w[e >> 3u] >> (4u * (e & 4u));
    let q = (vec4<u32>(h) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u);
    return (vec4<f32>(q) - 8.0) * w_scale(e >> 5u);
#endif
}
