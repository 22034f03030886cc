//! Chip generations and the limits that differ between them.
//!
//! Numbers come from `ane-private-api.md` §5.1 (ANEForge measurements): the spatial / contraction
//! axis is capped at 16384 on M1-M3 (16385 is rejected) and 65536 on M4 and later; the loaded
//! program cap is about 128 per process (the 129th load fails).

use std::fmt;
use std::str::FromStr;

/// An Apple Silicon generation, as far as ANE limits are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chip {
    /// M1 family (A14-class ANE).
    M1,
    /// M2 family.
    M2,
    /// M3 family.
    M3,
    /// M4 family.
    M4,
    /// M5 family.
    M5,
    /// Not identified: the most conservative limits.
    Unknown,
}

/// Limits a planner must respect on one chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChipLimits {
    /// Largest length of any tensor axis the compiler accepts (matmul M, K and N included).
    pub max_axis: usize,
    /// Programs that can be loaded at once in one process.
    pub max_loaded_programs: usize,
}

impl Chip {
    /// Every known chip, oldest first.
    pub const ALL: [Chip; 5] = [Chip::M1, Chip::M2, Chip::M3, Chip::M4, Chip::M5];

    /// The limits of this chip.
    pub fn limits(self) -> ChipLimits {
        let max_axis = match self {
            Chip::M1 | Chip::M2 | Chip::M3 | Chip::Unknown => 16384,
            Chip::M4 | Chip::M5 => 65536,
        };
        ChipLimits {
            max_axis,
            max_loaded_programs: 128,
        }
    }
}

impl fmt::Display for Chip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Chip::M1 => "m1",
            Chip::M2 => "m2",
            Chip::M3 => "m3",
            Chip::M4 => "m4",
            Chip::M5 => "m5",
            Chip::Unknown => "unknown",
        })
    }
}

impl FromStr for Chip {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "m1" => Ok(Chip::M1),
            "m2" => Ok(Chip::M2),
            "m3" => Ok(Chip::M3),
            "m4" => Ok(Chip::M4),
            "m5" => Ok(Chip::M5),
            "unknown" => Ok(Chip::Unknown),
            other => Err(format!(
                "unknown chip `{other}` (expected m1..m5 or unknown)"
            )),
        }
    }
}

/// The chip from `+[_ANEDeviceInfo aneSubType]` (e.g. `h16`, `H16G`, `h17s`).
///
/// ANEForge's `_targets.py` maps M(n) to H(n+12), so `h13`..`h16` are M1..M4; M5 parts report
/// `h17`/`h17s` (maderix PR #50), though maderix's base M5 reported `H16` (the same limits as M4,
/// so the conflict changes no limit). Unknown strings give `None`: the caller falls back to the CPU
/// brand string, then to [`Chip::Unknown`].
pub fn chip_from_ane_subtype(subtype: &str) -> Option<Chip> {
    let s = subtype.trim().to_ascii_lowercase();
    let digits: String = s
        .strip_prefix('h')?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    match digits.parse::<u32>().ok()? {
        13 => Some(Chip::M1),
        14 => Some(Chip::M2),
        15 => Some(Chip::M3),
        16 => Some(Chip::M4),
        17 => Some(Chip::M5),
        _ => None,
    }
}

/// The chip from the `machdep.cpu.brand_string` sysctl, e.g. `Apple M4 Pro`. `None` when the string
/// names no known M generation (Intel Macs, future chips).
pub fn chip_from_brand(brand: &str) -> Option<Chip> {
    let mut words = brand.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("apple") {
        return None;
    }
    let gen = words.next()?.to_ascii_lowercase();
    let n = gen.strip_prefix('m')?;
    match n {
        "1" => Some(Chip::M1),
        "2" => Some(Chip::M2),
        "3" => Some(Chip::M3),
        "4" => Some(Chip::M4),
        "5" => Some(Chip::M5),
        _ => None,
    }
}

/// The chip from whatever identification is available: the ANE sub-type first, then the brand
/// string, else [`Chip::Unknown`] (the most conservative limits).
pub fn identify_chip(ane_subtype: Option<&str>, brand: Option<&str>) -> Chip {
    ane_subtype
        .and_then(chip_from_ane_subtype)
        .or_else(|| brand.and_then(chip_from_brand))
        .unwrap_or(Chip::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ane_subtypes_map_to_generations() {
        for (s, c) in [
            ("h13", Chip::M1),
            ("H13G", Chip::M1),
            ("h14", Chip::M2),
            ("h15", Chip::M3),
            ("h16", Chip::M4),
            ("H16G", Chip::M4),
            (" h17 ", Chip::M5),
            ("h17s", Chip::M5),
        ] {
            assert_eq!(chip_from_ane_subtype(s), Some(c), "{s}");
        }
        for s in ["", "h", "h12", "h18", "m4", "x16", "hx16"] {
            assert_eq!(chip_from_ane_subtype(s), None, "{s}");
        }
    }

    #[test]
    fn brand_strings_map_to_generations() {
        for (s, c) in [
            ("Apple M1", Chip::M1),
            ("Apple M1 Max", Chip::M1),
            ("Apple M2 Pro", Chip::M2),
            ("Apple M3 Ultra", Chip::M3),
            ("Apple M4 Pro", Chip::M4),
            ("apple m5", Chip::M5),
        ] {
            assert_eq!(chip_from_brand(s), Some(c), "{s}");
        }
        for s in [
            "",
            "Apple",
            "Apple M9",
            "Apple A17 Pro",
            "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz",
        ] {
            assert_eq!(chip_from_brand(s), None, "{s}");
        }
    }

    #[test]
    fn identification_prefers_subtype_then_brand_then_unknown() {
        assert_eq!(identify_chip(Some("h16"), Some("Apple M1")), Chip::M4);
        assert_eq!(identify_chip(Some("weird"), Some("Apple M2")), Chip::M2);
        assert_eq!(identify_chip(None, None), Chip::Unknown);
        assert_eq!(Chip::Unknown.limits().max_axis, 16384);
    }

    #[test]
    fn axis_limit_splits_at_m4() {
        assert_eq!(Chip::M3.limits().max_axis, 16384);
        assert_eq!(Chip::M4.limits().max_axis, 65536);
        assert_eq!(Chip::Unknown.limits().max_axis, 16384);
    }

    #[test]
    fn parses_names_round_trip() {
        for c in Chip::ALL {
            assert_eq!(c.to_string().parse::<Chip>().unwrap(), c);
        }
        assert!("m9".parse::<Chip>().is_err());
    }
}
