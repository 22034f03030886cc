//! Copies between a packed tensor and a strided one, bounds-checked.
//!
//! Core ML hands out `MLMultiArray` storage as a pointer, a byte count and strides in elements.
//! The strides of an array Core ML made itself (a prediction's outputs) may be padded: rows
//! aligned to more than their length. The Core ML driver (`coreml/`, macOS only) copies each
//! feature between a surface, where the tensor is packed C-contiguous, and that storage through
//! [`scatter`] and [`gather`], which check every offset against the byte count first. They are
//! platform-neutral so that the layout arithmetic is tested here.

/// Checks `shape` against `strides` and the storage sizes; returns the element count.
fn check(
    shape: &[usize],
    strides: &[usize],
    elem: usize,
    packed: usize,
    storage: usize,
) -> Result<usize, String> {
    if shape.len() != strides.len() {
        return Err(format!(
            "shape {shape:?} and strides {strides:?} differ in rank"
        ));
    }
    let overflow = || format!("shape {shape:?} with strides {strides:?} overflows");
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    if count == 0 {
        return Ok(0);
    }
    let need = count.checked_mul(elem).ok_or_else(overflow)?;
    if packed < need {
        return Err(format!(
            "packed tensor of shape {shape:?} needs {need} bytes, has {packed}"
        ));
    }
    // Largest element offset: every index at its last value.
    let last = shape
        .iter()
        .zip(strides)
        .try_fold(0usize, |o, (&d, &s)| o.checked_add((d - 1).checked_mul(s)?))
        .ok_or_else(overflow)?;
    let span = last
        .checked_add(1)
        .and_then(|n| n.checked_mul(elem))
        .ok_or_else(overflow)?;
    if storage < span {
        return Err(format!(
            "strides {strides:?} of shape {shape:?} reach byte {span}, storage has {storage}"
        ));
    }
    Ok(count)
}

/// Calls `row(packed_offset, strided_offset)` (in elements) for the first element of every
/// innermost row, in order. Rank 0 is one row of one element.
fn for_each_row(shape: &[usize], strides: &[usize], mut row: impl FnMut(usize, usize)) {
    let outer = shape.len().saturating_sub(1);
    let row_len = shape.last().copied().unwrap_or(1);
    let mut index = vec![0usize; outer];
    let mut packed = 0;
    loop {
        let strided = index.iter().zip(strides).map(|(i, s)| i * s).sum();
        row(packed, strided);
        packed += row_len;
        // Odometer over the outer axes, innermost of them first.
        let mut d = outer;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// Copies the packed C-contiguous tensor at the start of `packed` (shape `shape`, `elem` bytes
/// per element) into `storage`, laid out with `strides` (in elements). Bytes of `storage` that no
/// element maps to are left as they are.
///
/// # Errors
/// Rank mismatch, overflow, or either buffer too small, in one line.
pub fn scatter(
    packed: &[u8],
    storage: &mut [u8],
    shape: &[usize],
    strides: &[usize],
    elem: usize,
) -> Result<(), String> {
    if check(shape, strides, elem, packed.len(), storage.len())? == 0 {
        return Ok(());
    }
    copy_rows(shape, strides, elem, |p, s, n| {
        storage[s..s + n].copy_from_slice(&packed[p..p + n]);
    });
    Ok(())
}

/// The reverse of [`scatter`]: copies the tensor laid out with `strides` in `storage` to the
/// start of `packed`, C-contiguous.
///
/// # Errors
/// As [`scatter`].
pub fn gather(
    storage: &[u8],
    packed: &mut [u8],
    shape: &[usize],
    strides: &[usize],
    elem: usize,
) -> Result<(), String> {
    if check(shape, strides, elem, packed.len(), storage.len())? == 0 {
        return Ok(());
    }
    copy_rows(shape, strides, elem, |p, s, n| {
        packed[p..p + n].copy_from_slice(&storage[s..s + n]);
    });
    Ok(())
}

/// Calls `copy(packed_byte, strided_byte, bytes)` for every run of elements that is contiguous
/// in both layouts: whole rows when the innermost stride is 1, single elements otherwise.
fn copy_rows(
    shape: &[usize],
    strides: &[usize],
    elem: usize,
    mut copy: impl FnMut(usize, usize, usize),
) {
    let row_len = shape.last().copied().unwrap_or(1);
    let inner = strides.last().copied().unwrap_or(1);
    for_each_row(shape, strides, |p, s| {
        if inner == 1 {
            copy(p * elem, s * elem, row_len * elem);
        } else {
            for i in 0..row_len {
                copy((p + i) * elem, (s + i * inner) * elem, elem);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(n: usize) -> Vec<u8> {
        (0..n).map(|i| i as u8).collect()
    }

    #[test]
    fn contiguous_strides_copy_verbatim() {
        let src = iota(2 * 3 * 4 * 2);
        let mut dst = vec![0xff; src.len()];
        scatter(&src, &mut dst, &[2, 3, 4], &[12, 4, 1], 2).unwrap();
        assert_eq!(dst, src);
        let mut back = vec![0; src.len()];
        gather(&dst, &mut back, &[2, 3, 4], &[12, 4, 1], 2).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn padded_rows_leave_the_padding_alone_and_round_trip() {
        // Shape [2, 3] of fp16, rows padded to 8 elements.
        let src = iota(2 * 3 * 2);
        let mut dst = vec![0xee; 2 * 8 * 2];
        scatter(&src, &mut dst, &[2, 3], &[8, 1], 2).unwrap();
        assert_eq!(&dst[..6], &src[..6]);
        assert!(dst[6..16].iter().all(|&b| b == 0xee), "padding untouched");
        assert_eq!(&dst[16..22], &src[6..12]);
        let mut back = vec![0; src.len() + 4];
        gather(&dst, &mut back, &[2, 3], &[8, 1], 2).unwrap();
        assert_eq!(&back[..12], &src[..]);
        assert_eq!(&back[12..], &[0; 4], "only the tensor is written");
    }

    #[test]
    fn non_unit_inner_strides_and_transposes() {
        // A [2, 3] tensor stored transposed (column-major): strides [1, 2].
        let src: Vec<u8> = vec![0, 1, 2, 3, 4, 5];
        let mut dst = vec![0; 6];
        scatter(&src, &mut dst, &[2, 3], &[1, 2], 1).unwrap();
        assert_eq!(dst, vec![0, 3, 1, 4, 2, 5]);
        let mut back = vec![0; 6];
        gather(&dst, &mut back, &[2, 3], &[1, 2], 1).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn rank_zero_and_empty_shapes() {
        let mut dst = vec![0; 2];
        scatter(&[7, 8], &mut dst, &[], &[], 2).unwrap();
        assert_eq!(dst, vec![7, 8]);
        let mut none: Vec<u8> = Vec::new();
        scatter(&[], &mut none, &[4, 0, 2], &[0, 0, 1], 2).unwrap();
        gather(&[], &mut none, &[0], &[1], 2).unwrap();
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let src = iota(12);
        let err = |r: Result<(), String>| r.unwrap_err();
        let mut small = vec![0; 10];
        assert!(err(scatter(&src, &mut small, &[2, 3], &[3, 1], 2)).contains("storage has 10"));
        let mut padded = vec![0; 20];
        assert!(err(scatter(&src, &mut padded, &[2, 3], &[8, 1], 2)).contains("reach byte 22"),);
        let mut big = vec![0; 64];
        assert!(err(scatter(&src[..10], &mut big, &[2, 3], &[3, 1], 2)).contains("needs 12"));
        assert!(err(gather(&big, &mut [0; 4], &[2, 3], &[3, 1], 2)).contains("needs 12"));
        assert!(err(scatter(&src, &mut big, &[2, 3], &[1], 2)).contains("rank"));
        assert!(err(scatter(&src, &mut big, &[usize::MAX, 2], &[2, 1], 2)).contains("overflows"));
    }
}
