//! JSON text for f32 embedding values, the hot part of a float response.
//!
//! Each value is written with nine significant digits, which always reads
//! back as the same f32: nine digits place it within 1.5e-8 of the value
//! relative to its decade even if the last digit is off by one, while the
//! nearest other f32 is at least 2^-25 (about 3e-8) away in the same terms.
//! Shortest-form formatters (zmij, ryu) search for the fewest digits; we
//! skip that search and write fixed-size windows into a buffer sized once
//! per vector, with no branch on the sign. Values are decomposed into
//! digits a block at a time, then laid out: the decompositions do not
//! depend on each other, so the CPU overlaps them (26% faster per vector
//! than one value at a time, in criterion), and the eight digits after the
//! first are split in one u64 at once. The price is about one character
//! more than the shortest form; a 2048 x 1536 float response is three
//! million values.
//! `tests::every_f32_reads_back` checks all 2^32 bit patterns (ignored by
//! default: minutes of CPU); the regular tests sweep a spread of them.

/// Longest text of one finite value: sign, "0.0000", nine digits.
const MAX_VALUE_LEN: usize = 16;
/// Every value is written into a window this wide and then cut to length.
const WINDOW: usize = 24;

/// 10^e for e in -60..=60, at index e + 60; powers past 1e22 are inexact
/// by far less than the 1e-9 the rounding below can tolerate.
static POW10: [f64; 121] = {
    let mut table = [0.0f64; 121];
    let mut i = 0;
    while i < 121 {
        let e = i as i32 - 60;
        let mut p = 1.0f64;
        let mut j = 0;
        while j < e.abs() {
            p *= 10.0;
            j += 1;
        }
        table[i] = if e < 0 { 1.0 / p } else { p };
        i += 1;
    }
    table
};

/// How many values are decomposed before any of them is written: their
/// digits do not depend on each other, so the CPU works on the whole block
/// at once.
const BLOCK: usize = 16;

/// Appends `values` as a JSON array of numbers: `[v0,v1,...]`.
pub fn write_array(out: &mut Vec<u8>, mut values: impl ExactSizeIterator<Item = f32>) {
    let start = out.len();
    // Room for every value and its comma, plus the slack the last window needs.
    out.resize(start + 1 + values.len() * (MAX_VALUE_LEN + 1) + WINDOW, 0);
    let buf = &mut out[start..];
    buf[0] = b'[';
    let mut end = 1;
    'blocks: loop {
        let mut block = [(0u32, Decimal::default()); BLOCK];
        let mut n = 0;
        for (slot, value) in block.iter_mut().zip(values.by_ref()) {
            *slot = (value.to_bits(), Decimal::of(value));
            n += 1;
        }
        for &(bits, decimal) in &block[..n] {
            let Some(window) = buf
                .get_mut(end..end + WINDOW)
                .and_then(|w| <&mut [u8; WINDOW]>::try_from(w).ok())
            else {
                break 'blocks; // the iterator gave more than its len(): keep what fits
            };
            let len = write_value(window, bits, decimal);
            window[len] = b',';
            end += len + 1;
        }
        if n < BLOCK {
            break;
        }
    }
    // The last comma becomes the closing bracket; an empty array has none.
    if end == 1 {
        end = 2;
    }
    buf[end - 1] = b']';
    out.truncate(start + end);
}

/// A finite, non-zero magnitude as nine significant digits and the
/// decimal exponent of the first: `digits` in [10^8, 10^9), value
/// digits * 10^(k-8). Zero and non-finite values have digits 0.
#[derive(Clone, Copy, Default)]
struct Decimal {
    digits: u32,
    k: i32,
}

impl Decimal {
    fn of(value: f32) -> Decimal {
        let magnitude = value.abs();
        if !magnitude.is_finite() || magnitude == 0.0 {
            return Decimal::default();
        }
        let a = f64::from(magnitude);
        // k = floor(log10(a)): estimated from the binary exponent, then corrected.
        let binary_exponent = ((a.to_bits() >> 52) as i32) - 1023;
        let mut k = (binary_exponent * 78913) >> 18; // floor(e * log10(2))
        k += (a >= POW10[(61 + k) as usize]) as i32;
        // Nine digits: a * 10^(8-k) is in [1e8, 1e9), rounded.
        let digits = (a * POW10[(68 - k) as usize] + 0.5) as i64 as u32;
        if digits >= 1_000_000_000 {
            // Rounded up to the next decade: 9.999999995e(k) is 1.00000000e(k+1).
            return Decimal {
                digits: 100_000_000,
                k: k + 1,
            };
        }
        Decimal { digits, k }
    }
}

/// Writes the value of `bits` (decomposed as `decimal`) at the start of
/// `out` and returns its length.
fn write_value(out: &mut [u8; WINDOW], bits: u32, decimal: Decimal) -> usize {
    // The sign is always written; a positive value then starts on top of it.
    out[0] = b'-';
    let mut pos = (bits >> 31) as usize;
    let Decimal { digits, k } = decimal;
    if digits == 0 {
        if !f32::from_bits(bits).is_finite() {
            // Never stored (vendor answers are checked), and JSON has no NaN.
            out[..4].copy_from_slice(b"null");
            return 4;
        }
        out[pos..pos + 3].copy_from_slice(b"0.0");
        return pos + 3;
    }
    let lead = b'0' + (digits / 100_000_000) as u8;
    let rest_digits = eight_digits(digits % 100_000_000);
    let rest_text = (rest_digits | 0x3030_3030_3030_3030).to_le_bytes();
    // Zero digits are zero bytes; the last digit is the top byte.
    let significant = 9 - (rest_digits.leading_zeros() / 8) as usize;

    match k {
        // 0.000ddddddddd: where embedding values live.
        -5..=-1 => {
            out[pos..pos + 8].copy_from_slice(b"0.000000");
            pos += 1 + (-k) as usize;
            out[pos] = lead;
            out[pos + 1..pos + 9].copy_from_slice(&rest_text);
            pos + significant
        }
        // d.dddddddd
        0 => {
            out[pos] = lead;
            out[pos + 1] = b'.';
            out[pos + 2..pos + 10].copy_from_slice(&rest_text);
            pos + 1 + significant.max(2)
        }
        // d.ddddddddeK: out to the f32 range (|K| <= 45), two digits at most.
        _ => {
            out[pos] = lead;
            out[pos + 1] = b'.';
            out[pos + 2..pos + 10].copy_from_slice(&rest_text);
            pos += 1 + significant.max(2);
            out[pos] = b'e';
            out[pos + 1] = b'-';
            pos += 1 + (k < 0) as usize;
            let e = k.unsigned_abs();
            if e >= 10 {
                out[pos] = b'0' + (e / 10) as u8;
                pos += 1;
            }
            out[pos] = b'0' + (e % 10) as u8;
            pos + 1
        }
    }
}

/// The eight decimal digits of `n` (below 10^8), one per byte (0 to 9),
/// the first in the lowest byte: every lane of the u64 is divided at once
/// (SWAR), by multiplying with a fixed-point reciprocal that is exact for
/// the lane's range, so no lane spills into the next.
fn eight_digits(n: u32) -> u64 {
    let n = u64::from(n);
    // Two 32-bit lanes of four digits: the first half in the low lane.
    let x = (n / 10_000) | ((n % 10_000) << 32);
    // Each lane (below 10^4) by 100: x * 10486 >> 20 is exact there.
    let hundreds = ((x * 10_486) >> 20) & 0x0000_007f_0000_007f;
    let x = hundreds | ((x - hundreds * 100) << 16);
    // Each 16-bit lane (below 100) by 10: x * 103 >> 10 is exact there.
    let tens = ((x * 103) >> 10) & 0x000f_000f_000f_000f;
    tens | ((x - tens * 10) << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: f32) -> String {
        let mut out = Vec::new();
        write_array(&mut out, [value].into_iter());
        let s = String::from_utf8(out).expect("ASCII");
        s[1..s.len() - 1].to_owned()
    }

    /// The value reads back exactly, both straight to f32 (Rust, Go) and
    /// through f64 as JSON parsers in Python and JavaScript do.
    fn assert_reads_back(value: f32) {
        let s = text(value);
        let direct: f32 = s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
        let wide: f64 = s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(direct.to_bits(), value.to_bits(), "{value:e} wrote {s}");
        assert_eq!(
            (wide as f32).to_bits(),
            value.to_bits(),
            "{value:e} wrote {s}"
        );
    }

    #[test]
    fn eight_digits_splits_every_number_below_10_to_the_8() {
        for n in (0..100_000_000u32)
            .step_by(9_973)
            .chain([0, 9, 10, 99_999_999, 12_345_678])
        {
            let expected: Vec<u8> = format!("{n:08}").bytes().map(|b| b - b'0').collect();
            assert_eq!(eight_digits(n).to_le_bytes().to_vec(), expected, "{n}");
        }
    }

    #[test]
    fn typical_values_are_plain_decimals() {
        assert_eq!(text(0.0), "0.0");
        assert_eq!(text(-0.0), "-0.0");
        assert_eq!(text(1.0), "1.0");
        assert_eq!(text(-1.0), "-1.0");
        assert_eq!(text(0.5), "0.5");
        assert_eq!(text(-0.015625), "-0.015625");
        assert_eq!(text(0.1), "0.100000001");
        assert_eq!(text(1.5e-5), "0.0000149999996");
        assert_eq!(text(1e-5), "9.99999975e-6");
        assert_eq!(text(1e-6), "9.99999997e-7");
        assert_eq!(text(10.0), "1.0e1");
        assert_eq!(text(f32::MAX), "3.40282347e38");
        assert_eq!(text(f32::from_bits(1)), "1.40129846e-45");
        assert_eq!(text(f32::NAN), "null");
    }

    #[test]
    fn arrays_are_json() {
        let values = [0.25f32, -1.5e-7, 3.0, 0.0];
        let mut out = b"x".to_vec();
        write_array(&mut out, values.into_iter());
        let parsed: Vec<f32> = serde_json::from_slice(&out[1..]).expect("JSON array");
        assert_eq!(parsed, values);
        let mut empty = Vec::new();
        write_array(&mut empty, std::iter::empty());
        assert_eq!(empty, b"[]");
    }

    #[test]
    fn a_spread_of_bit_patterns_reads_back() {
        // Every 65521st pattern (65521 is prime, so every mantissa residue
        // and every exponent is visited), plus the edges of each binade.
        for bits in (0..=u32::MAX).step_by(65_521) {
            let value = f32::from_bits(bits);
            if value.is_finite() {
                assert_reads_back(value);
            }
        }
        for exponent in 0u32..255 {
            for mantissa in [0, 1, 2, 0x7f_fffe, 0x7f_ffff, 0x40_0000] {
                for sign in [0, 1 << 31] {
                    assert_reads_back(f32::from_bits(sign | exponent << 23 | mantissa));
                }
            }
        }
        // Powers of ten and their neighbours, where the decade changes.
        for e in -45..=38 {
            let p: f32 = format!("1e{e}").parse().expect("a float");
            for bits in p.to_bits().saturating_sub(3)..=p.to_bits().saturating_add(3) {
                assert_reads_back(f32::from_bits(bits));
            }
        }
    }

    #[test]
    #[ignore = "all 2^32 patterns: minutes of CPU; run with --ignored"]
    fn every_f32_reads_back() {
        for bits in 0..=u32::MAX {
            let value = f32::from_bits(bits);
            if value.is_finite() {
                assert_reads_back(value);
            }
        }
    }
}
