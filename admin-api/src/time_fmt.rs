//! The timestamp formats the API families use, in one place.

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

const COMPUTE: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
const KEYSTONE: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
const PDISK: &[FormatItem<'static>] =
    format_description!("[year]/[month]/[day] [hour]:[minute]:[second]");
const SECONDS_Z: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

fn fmt(t: OffsetDateTime, f: &[FormatItem<'static>]) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(f)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00"))
}

/// Nova/Cinder: `2013-02-18T14:51:17.970024` (UTC, no zone suffix).
pub fn compute(t: OffsetDateTime) -> String {
    fmt(t, COMPUTE)
}

/// Keystone: `2015-11-07T02:58:43.578887Z`.
pub fn keystone(t: OffsetDateTime) -> String {
    fmt(t, KEYSTONE)
}

/// pdisk: `2011/07/28 15:01:40` (the original used server local time; cairn uses UTC).
pub fn pdisk(t: OffsetDateTime) -> String {
    fmt(t, PDISK)
}

/// Glance and Compute servers: `2016-10-25T12:02:09Z`.
pub fn seconds_z(t: OffsetDateTime) -> String {
    fmt(t, SECONDS_Z)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    #[test]
    fn formats() {
        let t = datetime!(2011-07-28 15:01:40.970024 UTC);
        assert_eq!(super::compute(t), "2011-07-28T15:01:40.970024");
        assert_eq!(super::keystone(t), "2011-07-28T15:01:40.970024Z");
        assert_eq!(super::pdisk(t), "2011/07/28 15:01:40");
        assert_eq!(super::seconds_z(t), "2011-07-28T15:01:40Z");
    }
}
