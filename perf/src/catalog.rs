//! The device catalog: every figure about a device model, in one place.
//!
//! Figures come from `DOMAIN.md` ("Devices and their image streams"). Those marked there
//! as estimates are flagged with [`ModelSpec::estimated`]; correct them here and every
//! capacity figure, licence check and load schedule follows.

use std::fmt;
use std::str::FromStr;

/// Seconds in a day, for daily totals.
const DAY_S: u64 = 86_400;

/// Interval between two telemetry samples of one device (DOMAIN.md: "one sample a minute").
pub const TELEMETRY_INTERVAL_S: u32 = 60;

/// Interval between two alarms of one device: the door opened for a dish check about once an
/// hour, raised in one TELEMETRY and cleared in the next. An estimate: DOMAIN.md names door
/// events and alarms but gives no rate.
pub const ALARM_INTERVAL_S: u32 = 3600;

/// The alarm the load generator raises at [`ALARM_INTERVAL_S`].
pub const ALARM_CODE_SIMULATED: &str = "DOOR-OPEN";

/// The telemetry channels every device reports, one sample each per
/// [`TELEMETRY_INTERVAL_S`] (DOMAIN.md: "about 10 channels at one sample a minute").
const TELEMETRY_CHANNELS: [&str; 10] = [
    "temperature_c",
    "temperature_set_c",
    "co2_percent",
    "co2_set_percent",
    "o2_percent",
    "o2_set_percent",
    "gas_pressure_kpa",
    "gas_consumption_l",
    "dishes_loaded",
    "disk_used_percent",
];

/// The names of the telemetry channels a device reports.
pub fn telemetry_channels() -> &'static [&'static str] {
    &TELEMETRY_CHANNELS
}

/// The monitoring channels: every telemetry channel an instrument of the catalog may report
/// (DOMAIN.md, "Instrument telemetry"). Only samples on these channels are uploaded to the
/// vendor's monitoring (docs/ims.md); the ten of [`telemetry_channels`] are among them.
/// Append only: the monitoring side keys its records on these names.
pub const MONITORING_CHANNELS: &[&str] = &[
    "temperature_c",
    "temperature_set_c",
    "co2_percent",
    "co2_set_percent",
    "o2_percent",
    "o2_set_percent",
    "humidity_percent",
    "gas_pressure_kpa",
    "co2_pressure_kpa",
    "n2_pressure_kpa",
    "gas_consumption_l",
    "co2_flow_l_per_h",
    "n2_flow_l_per_h",
    "co2_consumption_l",
    "n2_consumption_l",
    "dishes_loaded",
    "load_events",
    "unload_events",
    "door_open",
    "camera_ok",
    "imaging_ok",
    "power_ok",
    "ups_battery_percent",
    "disk_used_percent",
    "disk_free_bytes",
    "last_sync_age_s",
    "cpu_temperature_c",
    "fan_rpm",
    "uptime_s",
];

/// Alarm codes of the time-lapse models: first those of every model (culture environment, gas
/// supply, power, disk and the link to the server, [`ALARM_CODES_CULTURE`]), then imaging. Only
/// alarms with a code of the instrument's model are uploaded to the vendor's monitoring;
/// anything else (a code made of a patient's name, a dish id) is withheld. Append only, each
/// part at its end.
const ALARM_CODES_TIME_LAPSE: &[&str] = &[
    "TEMP-HIGH",
    "TEMP-LOW",
    "TEMP-SENSOR-FAULT",
    "CO2-HIGH",
    "CO2-LOW",
    "CO2-SENSOR-FAULT",
    "O2-HIGH",
    "O2-LOW",
    "O2-SENSOR-FAULT",
    "HUMIDITY-LOW",
    "GAS-PRESSURE-LOW",
    "CO2-SUPPLY-LOW",
    "N2-SUPPLY-LOW",
    "DOOR-OPEN",
    "POWER-FAIL",
    "UPS-ON-BATTERY",
    "UPS-BATTERY-LOW",
    "FAN-FAULT",
    "DISK-LOW",
    "DISK-FULL",
    "SERVER-UNREACHABLE",
    "CLOCK-FAULT",
    // Imaging.
    "CAMERA-FAULT",
    "IMAGING-FAULT",
    "FOCUS-FAULT",
    "LIGHT-FAULT",
    "MOTOR-FAULT",
    "DISH-POSITION-FAULT",
    "IMAGE-BACKLOG",
];

/// How many of [`ALARM_CODES_TIME_LAPSE`] every model has.
const ALARM_CODES_CULTURE_LEN: usize = 22;

/// The alarm codes of every model, culture incubators included.
const ALARM_CODES_CULTURE: &[&str] = ALARM_CODES_TIME_LAPSE.split_at(ALARM_CODES_CULTURE_LEN).0;

/// The alarm codes of a model the catalog does not know (a HELLO may name any model): the
/// codes every model has.
pub fn alarm_codes_of_unknown_model() -> &'static [&'static str] {
    ALARM_CODES_CULTURE
}

/// A model of incubator that can connect to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceModel {
    /// EmbryoScope D: 6 dishes of 12 wells, 7 focal planes.
    EmbryoScopeD,
    /// EmbryoScope+: 15 dishes of 16 wells, 11 focal planes.
    EmbryoScopePlus,
    /// EmbryoScope Flex: sized like the EmbryoScope+.
    EmbryoScopeFlex,
    /// EmbryoScope 8: 8 dishes of 16 wells, 11 focal planes.
    EmbryoScope8,
    /// CulturePro: a culture incubator without time-lapse imaging; telemetry only.
    CulturePro,
}

/// The fixed figures of one device model.
#[derive(Debug, PartialEq)]
pub struct ModelSpec {
    /// The vendor's name for the model, for people.
    pub display_name: &'static str,
    /// Culture dishes (slides) with images.
    pub dishes: u32,
    /// Wells (embryo positions) per dish.
    pub wells_per_dish: u32,
    /// Focal planes of one well's stack, as the instrument numbers them: offsets in µm
    /// for the EmbryoScope D, plane indices for the others.
    pub focal_planes: &'static [i32],
    /// Seconds between two acquisitions of the same well.
    pub interval_s: u32,
    /// Capacity units the model takes in a licence configuration (MISSION.md §3.3).
    pub capacity_units: u32,
    /// Typical size of one image: a 500 x 500 px greyscale JPEG, 15-40 KB (design figure 30 KB).
    pub image_bytes_typical: u32,
    /// The alarm codes the model raises; the monitoring upload's allowlist (docs/ims.md).
    /// DOMAIN.md names alarms (code, severity, raised, cleared) but not their codes: these
    /// lists are the catalog's, correct them here when a vendor list is at hand.
    pub alarm_codes: &'static [&'static str],
    /// True when any figure of this model is an estimate in DOMAIN.md.
    pub estimated: bool,
}

/// Design figure for one image's size (DOMAIN.md: "about 15-40 KB (design figure: 30 KB)").
const IMAGE_BYTES_TYPICAL: u32 = 30_000;

/// Ten minutes: the acquisition interval of every time-lapse model (an estimate in DOMAIN.md).
const INTERVAL_TEN_MINUTES_S: u32 = 600;

/// EmbryoScope D planes: -45..+45 µm in 15 µm steps.
const PLANES_ES_D: [i32; 7] = [-45, -30, -15, 0, 15, 30, 45];

/// Planes indexed -5..=+5 (EmbryoScope+, Flex, 8).
const PLANES_INDEXED_11: [i32; 11] = [-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5];

static SPEC_ES_D: ModelSpec = ModelSpec {
    display_name: "EmbryoScope D",
    dishes: 6,
    wells_per_dish: 12,
    focal_planes: &PLANES_ES_D,
    interval_s: INTERVAL_TEN_MINUTES_S,
    capacity_units: 1,
    image_bytes_typical: IMAGE_BYTES_TYPICAL,
    alarm_codes: ALARM_CODES_TIME_LAPSE,
    estimated: true, // interval
};

static SPEC_ES_PLUS: ModelSpec = ModelSpec {
    display_name: "EmbryoScope+",
    dishes: 15,
    wells_per_dish: 16,
    focal_planes: &PLANES_INDEXED_11,
    interval_s: INTERVAL_TEN_MINUTES_S,
    capacity_units: 2,
    image_bytes_typical: IMAGE_BYTES_TYPICAL,
    alarm_codes: ALARM_CODES_TIME_LAPSE,
    estimated: true, // positions, interval
};

static SPEC_ES_FLEX: ModelSpec = ModelSpec {
    display_name: "EmbryoScope Flex",
    dishes: 15,
    wells_per_dish: 16,
    focal_planes: &PLANES_INDEXED_11,
    interval_s: INTERVAL_TEN_MINUTES_S,
    capacity_units: 2,
    image_bytes_typical: IMAGE_BYTES_TYPICAL,
    alarm_codes: ALARM_CODES_TIME_LAPSE,
    estimated: true, // positions, planes, interval
};

static SPEC_ES_8: ModelSpec = ModelSpec {
    display_name: "EmbryoScope 8",
    dishes: 8,
    wells_per_dish: 16,
    focal_planes: &PLANES_INDEXED_11,
    interval_s: INTERVAL_TEN_MINUTES_S,
    capacity_units: 1,
    image_bytes_typical: IMAGE_BYTES_TYPICAL,
    alarm_codes: ALARM_CODES_TIME_LAPSE,
    estimated: true, // positions, planes, interval
};

static SPEC_CULTURE_PRO: ModelSpec = ModelSpec {
    display_name: "CulturePro",
    dishes: 0,
    wells_per_dish: 0,
    focal_planes: &[],
    interval_s: INTERVAL_TEN_MINUTES_S,
    capacity_units: 1,
    image_bytes_typical: IMAGE_BYTES_TYPICAL,
    alarm_codes: ALARM_CODES_CULTURE,
    estimated: true, // treated as telemetry only
};

impl DeviceModel {
    /// Every model, in catalog order.
    pub const ALL: [DeviceModel; 5] = [
        DeviceModel::EmbryoScopeD,
        DeviceModel::EmbryoScopePlus,
        DeviceModel::EmbryoScopeFlex,
        DeviceModel::EmbryoScope8,
        DeviceModel::CulturePro,
    ];

    /// The short, stable name used in configuration, command lines and reports.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceModel::EmbryoScopeD => "es-d",
            DeviceModel::EmbryoScopePlus => "es-plus",
            DeviceModel::EmbryoScopeFlex => "es-flex",
            DeviceModel::EmbryoScope8 => "es-8",
            DeviceModel::CulturePro => "culturepro",
        }
    }

    /// The model's figures.
    pub fn spec(&self) -> &'static ModelSpec {
        match self {
            DeviceModel::EmbryoScopeD => &SPEC_ES_D,
            DeviceModel::EmbryoScopePlus => &SPEC_ES_PLUS,
            DeviceModel::EmbryoScopeFlex => &SPEC_ES_FLEX,
            DeviceModel::EmbryoScope8 => &SPEC_ES_8,
            DeviceModel::CulturePro => &SPEC_CULTURE_PRO,
        }
    }

    /// True for the large models (EmbryoScope+ and Flex) that the licence rules count apart.
    pub fn is_plus_or_flex(&self) -> bool {
        matches!(
            self,
            DeviceModel::EmbryoScopePlus | DeviceModel::EmbryoScopeFlex
        )
    }
}

impl fmt::Display for DeviceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A device model name that is not in the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownModel {
    /// The name as given.
    pub name: String,
}

impl fmt::Display for UnknownModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let valid: Vec<&str> = DeviceModel::ALL.iter().map(|m| m.name()).collect();
        write!(
            f,
            "unknown device model `{}`; valid models: {}",
            self.name,
            valid.join(", ")
        )
    }
}

impl std::error::Error for UnknownModel {}

impl FromStr for DeviceModel {
    type Err = UnknownModel;

    /// Parses a model name such as `es-plus` (ASCII case is ignored).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        DeviceModel::ALL
            .into_iter()
            .find(|model| model.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| UnknownModel {
                name: text.to_owned(),
            })
    }
}

impl ModelSpec {
    /// Embryo positions with images: dishes x wells.
    pub fn positions(&self) -> u32 {
        self.dishes * self.wells_per_dish
    }

    /// Images of one full acquisition cycle: positions x focal planes.
    pub fn images_per_cycle(&self) -> u64 {
        u64::from(self.positions()) * self.focal_planes.len() as u64
    }

    /// Mean image arrival rate of one fully loaded device.
    pub fn images_per_second(&self) -> f64 {
        if self.interval_s == 0 {
            return 0.0;
        }
        self.images_per_cycle() as f64 / f64::from(self.interval_s)
    }

    /// Mean image bytes per second of one fully loaded device.
    pub fn bytes_per_second(&self) -> f64 {
        self.images_per_second() * f64::from(self.image_bytes_typical)
    }

    /// Images a fully loaded device makes in one day.
    pub fn images_per_day(&self) -> u64 {
        if self.interval_s == 0 {
            return 0;
        }
        self.images_per_cycle() * DAY_S / u64::from(self.interval_s)
    }

    /// Image bytes a fully loaded device makes in one day.
    pub fn bytes_per_day(&self) -> u64 {
        self.images_per_day() * u64::from(self.image_bytes_typical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es_plus_makes_2640_images_per_cycle_at_about_4_4_per_second() {
        let spec = DeviceModel::EmbryoScopePlus.spec();
        assert_eq!(spec.positions(), 240);
        assert_eq!(spec.images_per_cycle(), 2640);
        assert!((spec.images_per_second() - 4.4).abs() < 1e-9);
        // DOMAIN.md: about 130 KB/s, 380,000 images and 11 GB a day.
        assert!((spec.bytes_per_second() - 132_000.0).abs() < 1.0);
        assert_eq!(spec.images_per_day(), 380_160);
        assert!((11_000_000_000..11_500_000_000).contains(&spec.bytes_per_day()));
    }

    #[test]
    fn es_plus_and_flex_take_two_units_the_others_one() {
        for model in DeviceModel::ALL {
            let expected = if model.is_plus_or_flex() { 2 } else { 1 };
            assert_eq!(model.spec().capacity_units, expected, "{model}");
        }
    }

    #[test]
    fn es_d_has_seven_planes_15_um_apart() {
        let spec = DeviceModel::EmbryoScopeD.spec();
        assert_eq!(spec.positions(), 72);
        assert_eq!(spec.focal_planes.len(), 7);
        assert!(spec.focal_planes.windows(2).all(|w| w[1] - w[0] == 15));
        assert_eq!(spec.images_per_cycle(), 504);
    }

    #[test]
    fn culturepro_makes_no_images() {
        let spec = DeviceModel::CulturePro.spec();
        assert_eq!(spec.images_per_cycle(), 0);
        assert_eq!(spec.images_per_second(), 0.0);
    }

    #[test]
    fn names_parse_back_and_unknown_names_list_valid_ones() {
        for model in DeviceModel::ALL {
            assert_eq!(model.name().parse::<DeviceModel>(), Ok(model));
        }
        assert_eq!("ES-Plus".parse(), Ok(DeviceModel::EmbryoScopePlus));
        let error = "es-9".parse::<DeviceModel>().unwrap_err().to_string();
        assert!(error.contains("`es-9`"), "{error}");
        assert!(
            error.contains("es-d, es-plus, es-flex, es-8, culturepro"),
            "{error}"
        );
    }

    #[test]
    fn monitoring_lists_are_closed_well_formed_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for channel in MONITORING_CHANNELS {
            assert!(channel
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!(seen.insert(*channel), "{channel} twice");
        }
        for channel in telemetry_channels() {
            assert!(MONITORING_CHANNELS.contains(channel), "{channel}");
        }
        for model in DeviceModel::ALL {
            let codes = model.spec().alarm_codes;
            let mut seen = std::collections::HashSet::new();
            for code in codes {
                // An upper-case letter, then upper-case letters, digits or `-`; short.
                assert!(code.len() <= 32 && code.as_bytes()[0].is_ascii_uppercase());
                assert!(code
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-'));
                assert!(seen.insert(*code), "{model}: {code} twice");
            }
            assert_eq!(ALARM_CODES_CULTURE.last(), Some(&"CLOCK-FAULT"));
            // Every model has the common codes; only imaging models the imaging ones.
            for code in ALARM_CODES_CULTURE {
                assert!(codes.contains(code), "{model} lacks {code}");
            }
            assert_eq!(
                codes.contains(&"CAMERA-FAULT"),
                model.spec().images_per_cycle() > 0,
                "{model}"
            );
        }
        assert_eq!(alarm_codes_of_unknown_model(), ALARM_CODES_CULTURE);
    }

    #[test]
    fn about_ten_telemetry_channels_once_a_minute() {
        assert_eq!(telemetry_channels().len(), 10);
        assert_eq!(TELEMETRY_INTERVAL_S, 60);
    }
}
