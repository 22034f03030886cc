//! Is there a real Neural Engine here, outside a virtual machine? Decided at engine open, before
//! any compile.
//!
//! On an Intel Mac or in a macOS virtual machine AppleNeuralEngine.framework and Core ML load, their
//! classes resolve, and both engines would open; their canaries would then spend compile budget
//! (and, on the private API, poke a driver with no device behind it) before failing. So each
//! engine reads a few signals at open and refuses with [`crate::EngineError::Unavailable`] when
//! one says no:
//! - public: the `kern.hv_vmm_present` sysctl (1 in a virtual machine), `hw.optional.arm64`
//!   (1 on Apple silicon; absent or 0 on Intel) and the CPU brand string (`Intel ...`);
//! - private: `+[_ANEDeviceInfo hasANE]` and `+[_ANEDeviceInfo isVirtualMachine]`. The private
//!   driver reads them from the framework it opened. Core ML only looks the class up if something
//!   else already loaded it (never `dlopen`s the private framework): there it is extra evidence,
//!   and its absence is unknown, so the public road never depends on the private framework.
//!
//! A signal that could not be read is unknown and never refuses by itself: the canaries decide.
//! The macOS code only reads the signals; [`decide`] is the rule, tested here.

/// What the machine says about itself; `None`: the signal could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSignals {
    /// `kern.hv_vmm_present` (public sysctl): true in a virtual machine.
    pub hv_vmm_present: Option<bool>,
    /// `hw.optional.arm64` (public sysctl): true on Apple silicon.
    pub arm64: Option<bool>,
    /// `machdep.cpu.brand_string`, e.g. `Apple M4 Pro`.
    pub brand: Option<String>,
    /// `+[_ANEDeviceInfo hasANE]` (private), when the class and method were found.
    pub has_ane: Option<bool>,
    /// `+[_ANEDeviceInfo isVirtualMachine]` (private), when the class and method were found.
    pub is_vm: Option<bool>,
}

impl HostSignals {
    /// Each signal as `(name, value)` for `ane doctor`: `yes`/`no`, the brand, or `unknown`.
    pub fn report(&self) -> Vec<(&'static str, String)> {
        let b = |v: Option<bool>| match v {
            Some(true) => "yes".to_string(),
            Some(false) => "no".to_string(),
            None => "unknown".to_string(),
        };
        vec![
            ("kern.hv_vmm_present", b(self.hv_vmm_present)),
            ("hw.optional.arm64", b(self.arm64)),
            (
                "machdep.cpu.brand_string",
                self.brand.clone().unwrap_or_else(|| "unknown".into()),
            ),
            ("_ANEDeviceInfo.hasANE", b(self.has_ane)),
            ("_ANEDeviceInfo.isVirtualMachine", b(self.is_vm)),
        ]
    }

    /// The signals in one line (`name value, ...`).
    pub fn summary(&self) -> String {
        self.report()
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether an engine may open on a machine with these signals: every signal that says "no Neural
/// Engine" or "virtual machine" refuses; unknown ones do not.
///
/// # Errors
/// Each refusing signal, in one line.
pub fn decide(s: &HostSignals) -> Result<(), String> {
    let mut why = Vec::new();
    if s.hv_vmm_present == Some(true) {
        why.push("kern.hv_vmm_present = 1: a virtual machine, which has no Neural Engine");
    }
    if s.is_vm == Some(true) {
        why.push("+[_ANEDeviceInfo isVirtualMachine] = YES: a virtual machine");
    }
    if s.arm64 == Some(false) {
        why.push("hw.optional.arm64 = 0: not Apple silicon, so no Neural Engine");
    }
    if s.brand
        .as_deref()
        .is_some_and(|b| b.trim_start().starts_with("Intel"))
    {
        why.push("the CPU is an Intel one: no Neural Engine");
    }
    if s.has_ane == Some(false) {
        why.push("+[_ANEDeviceInfo hasANE] = NO: this Mac has no Neural Engine");
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apple_silicon() -> HostSignals {
        HostSignals {
            hv_vmm_present: Some(false),
            arm64: Some(true),
            brand: Some("Apple M4 Pro".into()),
            has_ane: Some(true),
            is_vm: Some(false),
        }
    }

    #[test]
    fn a_real_apple_silicon_mac_passes_and_unknown_signals_do_not_refuse() {
        assert_eq!(decide(&apple_silicon()), Ok(()));
        // Core ML without the private class in the process: public signals only.
        let public_only = HostSignals {
            has_ane: None,
            is_vm: None,
            ..apple_silicon()
        };
        assert_eq!(decide(&public_only), Ok(()));
        // Nothing readable at all (an old macOS, a sandbox refusing sysctl): the canaries decide.
        assert_eq!(decide(&HostSignals::default()), Ok(()));
    }

    #[test]
    fn a_virtual_machine_is_refused_by_either_signal() {
        let vm = HostSignals {
            hv_vmm_present: Some(true),
            ..apple_silicon()
        };
        assert!(decide(&vm).unwrap_err().contains("kern.hv_vmm_present"));
        let vm = HostSignals {
            is_vm: Some(true),
            ..apple_silicon()
        };
        assert!(decide(&vm).unwrap_err().contains("isVirtualMachine"));
        // The private class absent: the public signal alone refuses.
        let vm = HostSignals {
            hv_vmm_present: Some(true),
            has_ane: None,
            is_vm: None,
            ..apple_silicon()
        };
        assert!(decide(&vm).is_err());
    }

    #[test]
    fn no_neural_engine_is_refused_with_every_reason() {
        let intel = HostSignals {
            hv_vmm_present: Some(false),
            arm64: Some(false),
            brand: Some("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz".into()),
            has_ane: Some(false),
            is_vm: Some(false),
        };
        let e = decide(&intel).unwrap_err();
        for part in ["hw.optional.arm64", "Intel", "hasANE"] {
            assert!(e.contains(part), "{e}");
        }
        let no_ane = HostSignals {
            has_ane: Some(false),
            ..apple_silicon()
        };
        assert!(decide(&no_ane).unwrap_err().contains("hasANE"));
    }

    #[test]
    fn the_report_names_every_signal() {
        let r = HostSignals {
            has_ane: None,
            ..apple_silicon()
        }
        .report();
        let names: Vec<&str> = r.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "kern.hv_vmm_present",
                "hw.optional.arm64",
                "machdep.cpu.brand_string",
                "_ANEDeviceInfo.hasANE",
                "_ANEDeviceInfo.isVirtualMachine"
            ]
        );
        assert_eq!(r[0].1, "no");
        assert_eq!(r[2].1, "Apple M4 Pro");
        assert_eq!(r[3].1, "unknown");
        assert!(HostSignals::default()
            .summary()
            .contains("kern.hv_vmm_present unknown"));
    }
}
