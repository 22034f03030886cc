//! MILBlob v2 weight files (`weight.bin`), written and read byte for byte as coremltools' own
//! `StorageWriter` does.
//!
//! Layout (all little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | u32 | number of blobs in the file |
//! | 4 | u32 | format version, always 2 |
//! | 8..64 | | zero |
//! | M | u32 | sentinel `0xDEADBEEF` (`M` is the 64-aligned descriptor offset MIL refers to) |
//! | M+4 | u32 | dtype code |
//! | M+8 | u64 | payload size in bytes |
//! | M+16 | u64 | absolute payload offset, always `M + 64` |
//! | M+24 | u64 | unused bits in the last byte (sub-byte dtypes only) |
//! | M+32..M+64 | | zero |
//! | M+64 | size | payload |
//!
//! Why every field matters: third-party writers that left `count` at 1, skipped the 64-byte
//! alignment or mislabelled the dtype code (byte `M+4` is *not* a version) produced files that
//! some ANE generations reject. So [`BlobWriter`] writes each field as Apple's writer does, and
//! [`read_blob`] refuses any file where one of them is off, naming the field and its byte offset.
//! A `BLOBFILE(offset = ...)` in MIL text is the *descriptor* offset `M`, not the payload offset.

use std::fmt;

use thiserror::Error;

use crate::DType;

/// Size of the file header.
pub const HEADER_SIZE: u64 = 64;
/// Size of one blob descriptor.
pub const DESCRIPTOR_SIZE: u64 = 64;
/// Alignment of every descriptor (and therefore of every payload).
pub const ALIGNMENT: u64 = 64;
/// The only storage format version the MIL reader accepts.
pub const VERSION: u32 = 2;
/// Marker at the start of every descriptor.
pub const SENTINEL: u32 = 0xDEAD_BEEF;

/// The MILBlob dtype code of `dtype`, or `None` for types a blob cannot hold (`uint64`, `bool`,
/// `string`).
///
/// # Examples
///
/// ```
/// use ane_mil::{blob, DType};
/// assert_eq!(blob::dtype_code(DType::Fp16), Some(1));
/// assert_eq!(blob::dtype_code(DType::Bool), None);
/// ```
pub fn dtype_code(dtype: DType) -> Option<u32> {
    // Codes from MILBlob's BlobDataType.hpp; bf16 (5), int16 (6), uint16 (7), uint1..uint6 and
    // uint32 (15) exist too but have no DType variant yet.
    Some(match dtype {
        DType::Fp16 => 1,
        DType::Fp32 => 2,
        DType::UInt8 => 3,
        DType::Int8 => 4,
        DType::Int4 => 8,
        DType::UInt4 => 11,
        DType::Int32 => 14,
        DType::UInt64 | DType::Bool | DType::String => return None,
    })
}

/// Inverse of [`dtype_code`].
pub fn dtype_from_code(code: u32) -> Option<DType> {
    Some(match code {
        1 => DType::Fp16,
        2 => DType::Fp32,
        3 => DType::UInt8,
        4 => DType::Int8,
        8 => DType::Int4,
        11 => DType::UInt4,
        14 => DType::Int32,
        _ => return None,
    })
}

/// Which part of a blob file an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobField {
    /// The 64-byte file header as a whole.
    Header,
    /// Header `version`.
    Version,
    /// Header `count`.
    Count,
    /// The descriptor offset given by the caller (the MIL `BLOBFILE` offset).
    DescriptorOffset,
    /// Descriptor sentinel.
    Sentinel,
    /// Descriptor dtype code.
    DType,
    /// Descriptor payload offset.
    DataOffset,
    /// Descriptor payload size.
    Size,
    /// Descriptor padding bits.
    PaddingBits,
}

impl fmt::Display for BlobField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobField::Header => "header",
            BlobField::Version => "header version",
            BlobField::Count => "header count",
            BlobField::DescriptorOffset => "descriptor offset",
            BlobField::Sentinel => "descriptor sentinel",
            BlobField::DType => "descriptor dtype code",
            BlobField::DataOffset => "descriptor data offset",
            BlobField::Size => "descriptor size",
            BlobField::PaddingBits => "descriptor padding bits",
        })
    }
}

/// Why a blob could not be written or read.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum BlobError {
    /// A field holds a value the format does not allow.
    #[error("{field} at byte {offset}: found {found}, expected {expected}")]
    Invalid {
        /// The offending field.
        field: BlobField,
        /// Byte offset of the field in the file.
        offset: u64,
        /// The value found.
        found: u64,
        /// What the format requires.
        expected: String,
    },
    /// The file ends before the field (or the payload it describes) does.
    #[error("{field} at byte {offset}: needs bytes up to {end}, file has {len}")]
    Truncated {
        /// The field that runs past the end.
        field: BlobField,
        /// Byte offset of the field in the file.
        offset: u64,
        /// First byte past what the field needs.
        end: u64,
        /// File length.
        len: u64,
    },
    /// The dtype has no MILBlob code.
    #[error("dtype {0} cannot be stored in a MILBlob file")]
    UnsupportedDType(DType),
}

impl BlobError {
    /// The field the error is about (`None` for [`BlobError::UnsupportedDType`]).
    pub fn field(&self) -> Option<BlobField> {
        match self {
            BlobError::Invalid { field, .. } | BlobError::Truncated { field, .. } => Some(*field),
            BlobError::UnsupportedDType(_) => None,
        }
    }
}

/// Builds a MILBlob v2 file in memory, one blob after another.
///
/// # Examples
///
/// ```
/// use ane_mil::{blob::BlobWriter, DType};
/// let mut w = BlobWriter::new();
/// let off = w.push(DType::Fp16, &[0u8; 128], 0);
/// assert_eq!(off, 64);
/// assert_eq!(w.finish().len(), 128 + 128);
/// ```
#[derive(Clone, Debug)]
pub struct BlobWriter {
    buf: Vec<u8>,
    count: u32,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    /// An empty file (header only).
    pub fn new() -> Self {
        BlobWriter {
            buf: vec![0; HEADER_SIZE as usize],
            count: 0,
        }
    }

    /// Appends one blob and returns the offset of its descriptor, which is what a MIL
    /// `BLOBFILE(offset = ...)` must name.
    ///
    /// `data` is the already packed payload (sub-byte types LSB first); `padding_bits` is the
    /// number of unused bits in its last byte, which only sub-byte dtypes may have.
    ///
    /// # Errors
    ///
    /// [`BlobError::UnsupportedDType`] for dtypes without a blob code; [`BlobError::Invalid`]
    /// with [`BlobField::PaddingBits`] if `padding_bits` is not 0 for a whole-byte dtype, or is 8
    /// or more, or exceeds the bits the data holds.
    pub fn try_push(
        &mut self,
        dtype: DType,
        data: &[u8],
        padding_bits: u64,
    ) -> Result<u64, BlobError> {
        let code = dtype_code(dtype).ok_or(BlobError::UnsupportedDType(dtype))?;
        let descriptor = align_up(self.buf.len() as u64);
        let max_padding = if dtype.bits() < 8 { 7 } else { 0 };
        if padding_bits > max_padding || padding_bits > 8 * data.len() as u64 {
            return Err(BlobError::Invalid {
                field: BlobField::PaddingBits,
                offset: descriptor + 24,
                found: padding_bits,
                expected: format!("at most {}", max_padding.min(8 * data.len() as u64)),
            });
        }
        self.buf.resize(descriptor as usize, 0);
        let data_offset = descriptor + DESCRIPTOR_SIZE;
        self.buf.extend_from_slice(&SENTINEL.to_le_bytes());
        self.buf.extend_from_slice(&code.to_le_bytes());
        self.buf
            .extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(&data_offset.to_le_bytes());
        self.buf.extend_from_slice(&padding_bits.to_le_bytes());
        self.buf.resize(data_offset as usize, 0);
        self.buf.extend_from_slice(data);
        self.count += 1;
        Ok(descriptor)
    }

    /// Like [`BlobWriter::try_push`], for callers whose dtype and padding are fixed by
    /// construction.
    ///
    /// # Panics
    ///
    /// When [`BlobWriter::try_push`] would return an error.
    pub fn push(&mut self, dtype: DType, data: &[u8], padding_bits: u64) -> u64 {
        match self.try_push(dtype, data, padding_bits) {
            Ok(offset) => offset,
            Err(e) => panic!("BlobWriter::push: {e}"),
        }
    }

    /// Number of blobs pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The finished file. There is no padding after the last payload, as in coremltools' output.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[0..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf[4..8].copy_from_slice(&VERSION.to_le_bytes());
        self.buf
    }
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One blob inside a file, borrowed from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRef<'a> {
    /// Element type from the descriptor's dtype code.
    pub dtype: DType,
    /// The payload.
    pub data: &'a [u8],
    /// Unused bits in the last payload byte.
    pub padding_bits: u64,
}

fn u32_at(file: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(file[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(file: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(file[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the blob whose descriptor is at `offset`, checking the header and every descriptor field.
///
/// # Errors
///
/// A [`BlobError`] naming the first field that is wrong: the header (too short, version not 2,
/// count 0), the descriptor offset (inside the header, not 64-aligned, past the end), the
/// sentinel, an unknown dtype code, a data offset other than `offset + 64`, a size running past
/// the end of the file, or padding bits a whole-byte dtype cannot have.
///
/// # Examples
///
/// ```
/// use ane_mil::{blob, DType};
/// let mut w = blob::BlobWriter::new();
/// let off = w.push(DType::Int8, &[1, 2, 3], 0);
/// let file = w.finish();
/// let b = blob::read_blob(&file, off).unwrap();
/// assert_eq!((b.dtype, b.data), (DType::Int8, &[1u8, 2, 3][..]));
/// ```
pub fn read_blob(file: &[u8], offset: u64) -> Result<BlobRef<'_>, BlobError> {
    let len = file.len() as u64;
    if len < HEADER_SIZE {
        return Err(BlobError::Truncated {
            field: BlobField::Header,
            offset: 0,
            end: HEADER_SIZE,
            len,
        });
    }
    let version = u32_at(file, 4);
    if version != VERSION {
        return Err(BlobError::Invalid {
            field: BlobField::Version,
            offset: 4,
            found: version.into(),
            expected: VERSION.to_string(),
        });
    }
    let count = u32_at(file, 0);
    if count == 0 {
        return Err(BlobError::Invalid {
            field: BlobField::Count,
            offset: 0,
            found: 0,
            expected: "at least 1".into(),
        });
    }
    if offset < HEADER_SIZE || align_up(offset) != offset {
        return Err(BlobError::Invalid {
            field: BlobField::DescriptorOffset,
            offset,
            found: offset,
            expected: format!("a multiple of {ALIGNMENT} past the {HEADER_SIZE}-byte header"),
        });
    }
    let descriptor_end = offset.saturating_add(DESCRIPTOR_SIZE);
    if descriptor_end > len {
        return Err(BlobError::Truncated {
            field: BlobField::DescriptorOffset,
            offset,
            end: descriptor_end,
            len,
        });
    }
    let sentinel = u32_at(file, offset);
    if sentinel != SENTINEL {
        return Err(BlobError::Invalid {
            field: BlobField::Sentinel,
            offset,
            found: sentinel.into(),
            expected: format!("{SENTINEL:#x}"),
        });
    }
    let code = u32_at(file, offset + 4);
    let dtype = dtype_from_code(code).ok_or_else(|| BlobError::Invalid {
        field: BlobField::DType,
        offset: offset + 4,
        found: code.into(),
        expected: "a known dtype code (1, 2, 3, 4, 8, 11, 14)".into(),
    })?;
    let size = u64_at(file, offset + 8);
    let data_offset = u64_at(file, offset + 16);
    if data_offset != descriptor_end {
        return Err(BlobError::Invalid {
            field: BlobField::DataOffset,
            offset: offset + 16,
            found: data_offset,
            expected: descriptor_end.to_string(),
        });
    }
    let data_end = data_offset.saturating_add(size);
    if data_end > len {
        return Err(BlobError::Truncated {
            field: BlobField::Size,
            offset: offset + 8,
            end: data_end,
            len,
        });
    }
    let padding_bits = u64_at(file, offset + 24);
    let max_padding = if dtype.bits() < 8 { 7.min(8 * size) } else { 0 };
    if padding_bits > max_padding {
        return Err(BlobError::Invalid {
            field: BlobField::PaddingBits,
            offset: offset + 24,
            found: padding_bits,
            expected: format!("at most {max_padding}"),
        });
    }
    Ok(BlobRef {
        dtype,
        data: &file[data_offset as usize..data_end as usize],
        padding_bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_fp16_blob() -> Vec<u8> {
        let data: Vec<u8> = (0..128u32).map(|i| i as u8).collect();
        let mut w = BlobWriter::new();
        assert_eq!(w.push(DType::Fp16, &data, 0), 64);
        w.finish()
    }

    #[test]
    fn single_fp16_blob_matches_documented_128_byte_layout() {
        let f = one_fp16_blob();
        assert_eq!(f.len(), 128 + 128);
        let mut expected = vec![0u8; 128];
        expected[0] = 1; // count
        expected[4] = 2; // version
        expected[64..68].copy_from_slice(&[0xEF, 0xBE, 0xAD, 0xDE]);
        expected[68] = 1; // dtype code fp16
        expected[72..80].copy_from_slice(&128u64.to_le_bytes()); // size
        expected[80..88].copy_from_slice(&128u64.to_le_bytes()); // data offset
        expected.extend((0..128u32).map(|i| i as u8));
        assert_eq!(f, expected);
    }

    #[test]
    fn multi_blob_alignment_and_count_follow_coremltools() {
        // Same shape as the coremltools hexdump in the reference: fp16 x4, fp32 x3, int8 x5,
        // uint4 x5, int4 x3.
        let mut w = BlobWriter::new();
        let offs = [
            w.push(
                DType::Fp16,
                &[0x00, 0x3c, 0x00, 0x40, 0x00, 0xb8, 0xff, 0x7b],
                0,
            ),
            w.push(
                DType::Fp32,
                &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0, 0, 0, 0x60, 0x40],
                0,
            ),
            w.push(DType::Int8, &[0x80, 0xff, 0x00, 0x01, 0x7f], 0),
            w.push(DType::UInt4, &[0x21, 0xe3, 0x0f], 4),
            w.push(DType::Int4, &[0xf8, 0x07], 4),
        ];
        assert_eq!(offs, [64, 192, 320, 448, 576]);
        let f = w.finish();
        assert_eq!(f.len(), 640 + 2, "no padding after the last blob");
        assert_eq!(u32_at(&f, 0), 5);
        assert_eq!(u32_at(&f, 4), 2);
        assert!(f[8..64].iter().all(|&b| b == 0));
        // zero fill between the first payload and the second descriptor
        assert!(f[136..192].iter().all(|&b| b == 0));
        assert_eq!(&f[448..452], &[0xEF, 0xBE, 0xAD, 0xDE]);
        assert_eq!(u32_at(&f, 452), 11);
        assert_eq!(u64_at(&f, 456), 3);
        assert_eq!(u64_at(&f, 464), 512);
        assert_eq!(u64_at(&f, 472), 4);
        assert!(f[480..512].iter().all(|&b| b == 0));
        let b = read_blob(&f, 448).unwrap();
        assert_eq!(
            b,
            BlobRef {
                dtype: DType::UInt4,
                data: &[0x21, 0xe3, 0x0f],
                padding_bits: 4
            }
        );
        assert_eq!(
            read_blob(&f, 320).unwrap().data,
            &[0x80, 0xff, 0x00, 0x01, 0x7f]
        );
    }

    #[test]
    fn aligned_payload_leaves_no_gap() {
        let mut w = BlobWriter::new();
        assert_eq!(w.push(DType::Fp16, &[0; 64], 0), 64);
        assert_eq!(w.push(DType::Fp16, &[0; 64], 0), 192);
    }

    #[test]
    fn writer_rejects_unsupported_dtype_and_bad_padding() {
        let mut w = BlobWriter::new();
        assert_eq!(
            w.try_push(DType::Bool, &[1], 0),
            Err(BlobError::UnsupportedDType(DType::Bool))
        );
        assert_eq!(
            w.try_push(DType::Fp16, &[0, 0], 1).unwrap_err().field(),
            Some(BlobField::PaddingBits)
        );
        assert_eq!(
            w.try_push(DType::UInt4, &[0], 8).unwrap_err().field(),
            Some(BlobField::PaddingBits)
        );
        assert!(w.is_empty());
    }

    fn err_field(f: &[u8], off: u64) -> BlobField {
        read_blob(f, off).unwrap_err().field().unwrap()
    }

    #[test]
    fn every_malformed_field_is_named() {
        let good = one_fp16_blob();
        assert!(read_blob(&good, 64).is_ok());

        assert_eq!(err_field(&good[..40], 64), BlobField::Header);

        let mut f = good.clone();
        f[4] = 1;
        assert_eq!(
            read_blob(&f, 64),
            Err(BlobError::Invalid {
                field: BlobField::Version,
                offset: 4,
                found: 1,
                expected: "2".into()
            })
        );

        let mut f = good.clone();
        f[0] = 0;
        assert_eq!(err_field(&f, 64), BlobField::Count);

        assert_eq!(err_field(&good, 0), BlobField::DescriptorOffset);
        assert_eq!(err_field(&good, 96), BlobField::DescriptorOffset);
        assert_eq!(err_field(&good, 256), BlobField::DescriptorOffset);

        let mut f = good.clone();
        f[64] = 0xEE;
        assert_eq!(err_field(&f, 64), BlobField::Sentinel);

        let mut f = good.clone();
        f[68] = 5; // bf16: no DType for it
        let e = read_blob(&f, 64).unwrap_err();
        assert_eq!(e.field(), Some(BlobField::DType));
        assert!(e.to_string().contains("byte 68"), "{e}");

        let mut f = good.clone();
        f[80] = 192;
        assert_eq!(err_field(&f, 64), BlobField::DataOffset);

        let mut f = good.clone();
        f[72] = 129;
        assert_eq!(err_field(&f, 64), BlobField::Size);
        assert_eq!(err_field(&good[..255], 64), BlobField::Size);

        let mut f = good.clone();
        f[88] = 4; // padding bits on an fp16 blob
        assert_eq!(err_field(&f, 64), BlobField::PaddingBits);
    }

    fn blob_dtype() -> impl Strategy<Value = DType> {
        prop_oneof![
            Just(DType::Fp16),
            Just(DType::Fp32),
            Just(DType::Int32),
            Just(DType::Int8),
            Just(DType::UInt8),
            Just(DType::Int4),
            Just(DType::UInt4),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(blobs in prop::collection::vec(
            (blob_dtype(), prop::collection::vec(any::<u8>(), 0..200), 0u64..8), 1..6)) {
            let mut w = BlobWriter::new();
            let mut offs = Vec::new();
            for (d, data, pad) in &blobs {
                let pad = if d.bits() < 8 && !data.is_empty() { *pad } else { 0 };
                offs.push((w.push(*d, data, pad), pad));
            }
            let f = w.finish();
            prop_assert_eq!(u32_at(&f, 0) as usize, blobs.len());
            for ((d, data, _), (off, pad)) in blobs.iter().zip(offs) {
                prop_assert_eq!(off % 64, 0);
                let b = read_blob(&f, off).unwrap();
                prop_assert_eq!(b, BlobRef { dtype: *d, data, padding_bits: pad });
            }
            let (_, last, _) = blobs.last().unwrap();
            prop_assert_eq!(f.len() as u64, offs_last_end(&f, blobs.len(), last.len()));
        }
    }

    /// End of the last payload, found by walking the descriptors.
    fn offs_last_end(f: &[u8], count: usize, last_len: usize) -> u64 {
        let mut off = 64;
        for _ in 1..count {
            off = align_up(u64_at(f, off + 16) + u64_at(f, off + 8));
        }
        off + 64 + last_len as u64
    }
}
