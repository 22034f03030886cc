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

#[cfg(test)]
mod tests {
    use super::*;

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
