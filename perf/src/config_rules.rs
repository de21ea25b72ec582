//! The licence configuration rules (MISSION.md §3.3): how many devices and computers each
//! configuration allows.
//!
//! - Basic: 1 computer, and 1 EmbryoScope+/Flex or 2 of CulturePro / EmbryoScope D /
//!   EmbryoScope 8.
//! - High capacity: 4 computers, and 16 capacity units where an EmbryoScope+/Flex takes two
//!   (16 small, 14 + 1, ..., 2 + 7, or 8 EmbryoScope+/Flex).
//!
//! Both are expressed as three limits: capacity units, EmbryoScope+/Flex count, computers.
//! Unit counts come from the device catalog.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::catalog::DeviceModel;

/// A licence configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Configuration {
    /// One computer and two capacity units.
    Basic,
    /// Four computers and sixteen capacity units.
    HighCapacity,
}

impl Configuration {
    /// Every configuration, smallest first.
    pub const ALL: [Configuration; 2] = [Configuration::Basic, Configuration::HighCapacity];

    /// The stable name used in licence files, command lines and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Configuration::Basic => "basic",
            Configuration::HighCapacity => "high-capacity",
        }
    }

    /// Capacity units allowed (an EmbryoScope+/Flex takes two, other devices one).
    pub fn units_max(&self) -> u32 {
        match self {
            Configuration::Basic => 2,
            Configuration::HighCapacity => 16,
        }
    }

    /// EmbryoScope+/Flex devices allowed.
    pub fn plus_flex_max(&self) -> u32 {
        match self {
            Configuration::Basic => 1,
            Configuration::HighCapacity => 8,
        }
    }

    /// Viewer computers allowed.
    pub fn computers_max(&self) -> u32 {
        match self {
            Configuration::Basic => 1,
            Configuration::HighCapacity => 4,
        }
    }
}

impl fmt::Display for Configuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A configuration name that does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownConfiguration {
    /// The name as given.
    pub name: String,
}

impl fmt::Display for UnknownConfiguration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown configuration `{}`; valid configurations: basic, high-capacity",
            self.name
        )
    }
}

impl std::error::Error for UnknownConfiguration {}

impl FromStr for Configuration {
    type Err = UnknownConfiguration;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Configuration::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| UnknownConfiguration {
                name: text.to_owned(),
            })
    }
}

/// What a set of devices and computers uses of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// The configuration checked against.
    pub configuration: Configuration,
    /// Capacity units the devices take.
    pub units_used: u64,
    /// Capacity units allowed.
    pub units_max: u32,
    /// EmbryoScope+/Flex devices.
    pub plus_flex_used: u64,
    /// EmbryoScope+/Flex devices allowed.
    pub plus_flex_max: u32,
    /// Viewer computers.
    pub computers_used: u32,
    /// Viewer computers allowed.
    pub computers_max: u32,
}

/// One way a set of devices and computers exceeds a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigViolation {
    /// The devices take more capacity units than allowed.
    TooManyUnits {
        /// The configuration checked against.
        configuration: Configuration,
        /// Units the devices take.
        units_needed: u64,
        /// Devices per model (models with zero devices left out), for the message.
        devices: Vec<(DeviceModel, u64)>,
    },
    /// More EmbryoScope+/Flex devices than allowed.
    TooManyPlusFlex {
        /// The configuration checked against.
        configuration: Configuration,
        /// EmbryoScope+/Flex devices given.
        plus_flex: u64,
    },
    /// More viewer computers than allowed.
    TooManyComputers {
        /// The configuration checked against.
        configuration: Configuration,
        /// Computers given.
        computers: u32,
    },
}

impl fmt::Display for ConfigViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigViolation::TooManyUnits {
                configuration,
                units_needed,
                devices,
            } => write!(
                f,
                "{configuration} allows {} capacity units; these devices need {units_needed} ({})",
                configuration.units_max(),
                unit_breakdown(devices)
            ),
            ConfigViolation::TooManyPlusFlex {
                configuration,
                plus_flex,
            } => write!(
                f,
                "{configuration} allows {} EmbryoScope+/Flex; these devices include {plus_flex}",
                configuration.plus_flex_max()
            ),
            ConfigViolation::TooManyComputers {
                configuration,
                computers,
            } => write!(
                f,
                "{configuration} allows {} {}; {computers} requested",
                configuration.computers_max(),
                plural(u64::from(configuration.computers_max()), "computer")
            ),
        }
    }
}

impl std::error::Error for ConfigViolation {}

/// "9 x es-plus at 2 units, 2 x es-d at 1 unit".
fn unit_breakdown(devices: &[(DeviceModel, u64)]) -> String {
    let parts: Vec<String> = devices
        .iter()
        .map(|(model, count)| {
            let units = u64::from(model.spec().capacity_units);
            format!("{count} x {model} at {units} {}", plural(units, "unit"))
        })
        .collect();
    parts.join(", ")
}

fn plural(count: u64, word: &str) -> String {
    if count == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// Device counts summed per model, in catalog order, without models of count zero.
fn per_model(devices: &[(DeviceModel, u32)]) -> Vec<(DeviceModel, u64)> {
    DeviceModel::ALL
        .into_iter()
        .map(|model| {
            let count = devices
                .iter()
                .filter(|(m, _)| *m == model)
                .map(|(_, n)| u64::from(*n))
                .sum::<u64>();
            (model, count)
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Usage of `configuration` by the devices (model, count) and computers given.
pub fn usage(
    configuration: Configuration,
    devices: &[(DeviceModel, u32)],
    computers: u32,
) -> Usage {
    let counts = per_model(devices);
    let units_used = counts
        .iter()
        .map(|(model, n)| n * u64::from(model.spec().capacity_units))
        .sum();
    let plus_flex_used = counts
        .iter()
        .filter(|(model, _)| model.is_plus_or_flex())
        .map(|(_, n)| n)
        .sum();
    Usage {
        configuration,
        units_used,
        units_max: configuration.units_max(),
        plus_flex_used,
        plus_flex_max: configuration.plus_flex_max(),
        computers_used: computers,
        computers_max: configuration.computers_max(),
    }
}

/// Every way the devices and computers exceed `configuration` (empty when they fit).
pub fn violations(
    configuration: Configuration,
    devices: &[(DeviceModel, u32)],
    computers: u32,
) -> Vec<ConfigViolation> {
    let used = usage(configuration, devices, computers);
    let mut found = Vec::new();
    if used.units_used > u64::from(used.units_max) {
        found.push(ConfigViolation::TooManyUnits {
            configuration,
            units_needed: used.units_used,
            devices: per_model(devices),
        });
    }
    if used.plus_flex_used > u64::from(used.plus_flex_max) {
        found.push(ConfigViolation::TooManyPlusFlex {
            configuration,
            plus_flex: used.plus_flex_used,
        });
    }
    if used.computers_used > used.computers_max {
        found.push(ConfigViolation::TooManyComputers {
            configuration,
            computers,
        });
    }
    found
}

/// Checks devices (model, count) and computers against `configuration`: the usage when
/// they fit, otherwise the first limit they exceed (see [`violations`] for all of them).
pub fn check_devices(
    configuration: Configuration,
    devices: &[(DeviceModel, u32)],
    computers: u32,
) -> Result<Usage, ConfigViolation> {
    match violations(configuration, devices, computers)
        .into_iter()
        .next()
    {
        None => Ok(usage(configuration, devices, computers)),
        Some(violation) => Err(violation),
    }
}

/// Parses a device mix such as `es-plus:3,es-d:10` (model names of the catalog, counts of at
/// most 1,000; a model may appear once). Errors name the part that is wrong.
pub fn parse_devices(text: &str) -> Result<Vec<(DeviceModel, u32)>, String> {
    let mut devices: Vec<(DeviceModel, u32)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}` is not model:count (for example es-plus:3)"))?;
        let model: DeviceModel = name
            .parse()
            .map_err(|e: crate::catalog::UnknownModel| e.to_string())?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| format!("`{part}`: the count must be a whole number from 1 to 1000"))?;
        if devices.iter().any(|(m, _)| *m == model) {
            return Err(format!("{model} is named twice"));
        }
        devices.push((model, count));
    }
    Ok(devices)
}

/// The smallest configuration the devices and computers fit in; when none does, every
/// limit of the largest configuration that they exceed.
pub fn smallest_fitting(
    devices: &[(DeviceModel, u32)],
    computers: u32,
) -> Result<Configuration, Vec<ConfigViolation>> {
    let mut last = Vec::new();
    for configuration in Configuration::ALL {
        last = violations(configuration, devices, computers);
        if last.is_empty() {
            return Ok(configuration);
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceModel::*;

    #[test]
    fn high_capacity_fits_8_es_plus() {
        let used = check_devices(Configuration::HighCapacity, &[(EmbryoScopePlus, 8)], 4).unwrap();
        assert_eq!(used.units_used, 16);
        assert_eq!(used.plus_flex_used, 8);
    }

    #[test]
    fn high_capacity_refuses_9_es_plus_and_names_the_counts() {
        let error =
            check_devices(Configuration::HighCapacity, &[(EmbryoScopePlus, 9)], 1).unwrap_err();
        assert_eq!(
            error.to_string(),
            "high-capacity allows 16 capacity units; these devices need 18 (9 x es-plus at 2 units)"
        );
    }

    #[test]
    fn high_capacity_mixes_small_and_large_devices() {
        let mix = [
            (EmbryoScope8, 2),
            (EmbryoScopeFlex, 3),
            (EmbryoScopePlus, 4),
        ];
        assert!(check_devices(Configuration::HighCapacity, &mix, 1).is_ok());
        let over = [
            (EmbryoScope8, 3),
            (EmbryoScopeFlex, 3),
            (EmbryoScopePlus, 4),
        ];
        let error = check_devices(Configuration::HighCapacity, &over, 1)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "need 17 (4 x es-plus at 2 units, 3 x es-flex at 2 units, 3 x es-8 at 1 unit)"
            ),
            "{error}"
        );
    }

    #[test]
    fn basic_fits_two_es_d_or_one_es_plus() {
        assert!(check_devices(Configuration::Basic, &[(EmbryoScopeD, 2)], 1).is_ok());
        assert!(check_devices(Configuration::Basic, &[(EmbryoScopePlus, 1)], 1).is_ok());
        assert!(check_devices(
            Configuration::Basic,
            &[(CulturePro, 1), (EmbryoScope8, 1)],
            1
        )
        .is_ok());
    }

    #[test]
    fn basic_refuses_es_plus_with_es_d() {
        let devices = [(EmbryoScopePlus, 1), (EmbryoScopeD, 1)];
        let error = check_devices(Configuration::Basic, &devices, 1).unwrap_err();
        assert!(matches!(
            error,
            ConfigViolation::TooManyUnits {
                units_needed: 3,
                ..
            }
        ));
        assert_eq!(
            smallest_fitting(&devices, 1),
            Ok(Configuration::HighCapacity)
        );
    }

    #[test]
    fn computers_are_limited_to_one_and_four() {
        assert!(check_devices(Configuration::Basic, &[], 1).is_ok());
        let error = check_devices(Configuration::Basic, &[], 2).unwrap_err();
        assert_eq!(error.to_string(), "basic allows 1 computer; 2 requested");
        assert!(check_devices(Configuration::HighCapacity, &[], 4).is_ok());
        let error = check_devices(Configuration::HighCapacity, &[], 5).unwrap_err();
        assert_eq!(
            error.to_string(),
            "high-capacity allows 4 computers; 5 requested"
        );
    }

    #[test]
    fn smallest_fitting_picks_basic_when_it_suffices() {
        assert_eq!(
            smallest_fitting(&[(EmbryoScopeD, 2)], 1),
            Ok(Configuration::Basic)
        );
        assert_eq!(
            smallest_fitting(&[(EmbryoScopeD, 2)], 2),
            Ok(Configuration::HighCapacity)
        );
    }

    /// The manual's table (MISSION.md 3.3), every row: basic takes one EmbryoScope+/Flex or
    /// two small devices; high capacity 16 small ones where an EmbryoScope+/Flex counts two
    /// (16 small, 14 + 1, 12 + 2, ..., 0 + 8), with one computer and four.
    #[test]
    fn the_configuration_table_of_the_manual_row_by_row() {
        let smalls = [EmbryoScopeD, EmbryoScope8, CulturePro];
        let larges = [EmbryoScopePlus, EmbryoScopeFlex];
        for small in smalls {
            assert!(check_devices(Configuration::Basic, &[(small, 2)], 1).is_ok());
            assert!(check_devices(Configuration::Basic, &[(small, 3)], 1).is_err());
            for large in larges {
                assert!(check_devices(Configuration::Basic, &[(large, 1)], 1).is_ok());
                assert!(check_devices(Configuration::Basic, &[(large, 2)], 1).is_err());
                assert!(check_devices(Configuration::Basic, &[(large, 1), (small, 1)], 1).is_err());
                for plus in 0..=8u32 {
                    let room = 16 - 2 * plus;
                    let mut mix = vec![(small, room)];
                    if plus > 0 {
                        mix.push((large, plus));
                    }
                    mix.retain(|(_, n)| *n > 0);
                    let used = check_devices(Configuration::HighCapacity, &mix, 4)
                        .unwrap_or_else(|e| panic!("{plus} large + {room} small: {e}"));
                    assert_eq!(used.units_used, 16);
                    let mut over = mix.clone();
                    match over.iter_mut().find(|(m, _)| *m == small) {
                        Some((_, n)) => *n += 1,
                        None => over.push((small, 1)),
                    }
                    assert!(
                        check_devices(Configuration::HighCapacity, &over, 4).is_err(),
                        "{plus} large + {} small must not fit",
                        room + 1
                    );
                    assert_eq!(
                        smallest_fitting(&mix, 1),
                        Ok(if plus <= 1 && room + 2 * plus <= 2 && mix.len() == 1 {
                            Configuration::Basic
                        } else {
                            Configuration::HighCapacity
                        })
                    );
                }
            }
        }
        assert!(check_devices(Configuration::HighCapacity, &[(EmbryoScopeFlex, 9)], 4).is_err());
    }

    #[test]
    fn device_mixes_parse_with_clear_errors() {
        assert_eq!(
            parse_devices("es-plus:3, es-d:10").unwrap(),
            [(EmbryoScopePlus, 3), (EmbryoScopeD, 10)]
        );
        assert!(parse_devices("es-plus")
            .unwrap_err()
            .contains("model:count"));
        assert!(parse_devices("es-x:1")
            .unwrap_err()
            .contains("unknown device model"));
        assert!(parse_devices("es-d:0").unwrap_err().contains("1 to 1000"));
        assert!(parse_devices("es-d:1,es-d:2")
            .unwrap_err()
            .contains("twice"));
        assert!(parse_devices("").unwrap().is_empty());
    }

    #[test]
    fn smallest_fitting_reports_every_violation_of_the_largest() {
        let violations = smallest_fitting(&[(EmbryoScopeFlex, 10)], 6).unwrap_err();
        assert_eq!(violations.len(), 3);
        assert!(violations
            .iter()
            .all(|v| v.to_string().starts_with("high-capacity allows")));
    }

    #[test]
    fn repeated_models_are_summed() {
        let devices = [(EmbryoScopeD, 1), (EmbryoScopeD, 1)];
        assert_eq!(usage(Configuration::Basic, &devices, 0).units_used, 2);
    }

    #[test]
    fn configuration_names_parse_back() {
        for configuration in Configuration::ALL {
            assert_eq!(configuration.name().parse(), Ok(configuration));
        }
        let error = "large".parse::<Configuration>().unwrap_err().to_string();
        assert!(error.contains("basic, high-capacity"), "{error}");
    }
}
