//! `GET /v2/images`: Glance's query language (filters, sorting, pages), parsed with
//! Glance's messages and applied to the images the service says the caller may see.

use std::cmp::Ordering;

use time::{OffsetDateTime, format_description::well_known::Iso8601};

use super::error::{GlanceError, GlanceResult};
use super::service::{Image, ImageScope, MemberStatusFilter, VisibilityFilter};

/// `limit` when none is given, and the most a page holds (`limit_param_default`,
/// `api_limit_max`).
pub const LIMIT_DEFAULT: usize = 25;
pub const LIMIT_MAX: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Status,
    ContainerFormat,
    DiskFormat,
    Size,
    Id,
    CreatedAt,
    UpdatedAt,
}

const SORT_KEYS: [(&str, SortKey); 8] = [
    ("name", SortKey::Name),
    ("status", SortKey::Status),
    ("container_format", SortKey::ContainerFormat),
    ("disk_format", SortKey::DiskFormat),
    ("size", SortKey::Size),
    ("id", SortKey::Id),
    ("created_at", SortKey::CreatedAt),
    ("updated_at", SortKey::UpdatedAt),
];

impl SortKey {
    fn parse(s: &str) -> GlanceResult<SortKey> {
        SORT_KEYS
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                GlanceError::bad_request(format!(
                    "Invalid sort key: {s}. It must be one of the following: name, status, container_format, disk_format, size, id, created_at, updated_at."
                ))
            })
    }

    fn compare(self, a: &Image, b: &Image) -> Ordering {
        match self {
            SortKey::Name => a.name.cmp(&b.name),
            SortKey::Status => a.status.cmp(&b.status),
            SortKey::ContainerFormat => a.container_format.cmp(&b.container_format),
            SortKey::DiskFormat => a.disk_format.cmp(&b.disk_format),
            SortKey::Size => a.size.cmp(&b.size),
            SortKey::Id => a.id.cmp(&b.id),
            SortKey::CreatedAt => a.created_at.cmp(&b.created_at),
            SortKey::UpdatedAt => a.updated_at.cmp(&b.updated_at),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeOp {
    Gt,
    Gte,
    Lt,
    Lte,
    Eq,
    Neq,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    /// A base text attribute equal to one of the values.
    Column(&'static str, Vec<String>),
    /// An extra property equal to the value.
    Property(String, String),
    Tag(String),
    Protected(bool),
    OsHidden(bool),
    SizeMin(u64),
    SizeMax(u64),
    Time(&'static str, TimeOp, OffsetDateTime),
}

/// A parsed list request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub scope: ImageScope,
    pub limit: usize,
    pub marker: Option<String>,
    sort: Vec<(SortKey, bool)>,
    filters: Vec<Filter>,
    /// The query's parameters without `marker`, for `first` and `next`.
    params: Vec<(String, String)>,
}

fn bool_filter(name: &str, v: &str) -> GlanceResult<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(GlanceError::bad_request(format!(
            "Invalid value '{v}' for '{name}' filter. Valid values are 'true' or 'false'."
        ))),
    }
}

/// `in:a,"b,c"` values; `eq:` or no operator: one value.
fn column_values(v: &str) -> GlanceResult<Vec<String>> {
    let Some((op, rest)) = v.split_once(':') else {
        return Ok(vec![v.to_owned()]);
    };
    match op {
        "eq" => Ok(vec![rest.to_owned()]),
        "in" => Ok(split_in_list(rest)),
        other => Err(GlanceError::bad_request(format!(
            "Unable to filter by unknown operator '{other}'."
        ))),
    }
}

fn split_in_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn time_filter(name: &'static str, v: &str) -> GlanceResult<Filter> {
    let bad = || {
        GlanceError::bad_request(format!(
            "Bad \"{name}\" query filter format. Use ISO 8601 DateTime notation."
        ))
    };
    let (op, when) = match v.split_once(':') {
        Some((op @ ("gt" | "gte" | "lt" | "lte" | "eq" | "neq"), rest)) => (op, rest),
        _ => ("eq", v),
    };
    let op = match op {
        "gt" => TimeOp::Gt,
        "gte" => TimeOp::Gte,
        "lt" => TimeOp::Lt,
        "lte" => TimeOp::Lte,
        "neq" => TimeOp::Neq,
        _ => TimeOp::Eq,
    };
    let t = OffsetDateTime::parse(when, &Iso8601::DEFAULT).map_err(|_| bad())?;
    Ok(Filter::Time(name, op, t))
}

fn size_filter(v: &str) -> GlanceResult<u64> {
    v.parse().map_err(|_| {
        GlanceError::bad_request("Unable to filter on a range with a non-numeric value.")
    })
}

impl ListQuery {
    /// Parses a raw query string (parameters may repeat).
    pub fn parse(raw: Option<&str>) -> GlanceResult<ListQuery> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|_| GlanceError::bad_request("Malformed query string."))?;
        let mut q = ListQuery {
            scope: ImageScope {
                visibility: None,
                member_status: MemberStatusFilter::Accepted,
            },
            limit: LIMIT_DEFAULT,
            marker: None,
            sort: Vec::new(),
            filters: Vec::new(),
            params: Vec::new(),
        };
        let mut sort_keys = Vec::new();
        let mut sort_dirs = Vec::new();
        let mut sort_new = None;
        let mut hidden = None;
        for (k, v) in pairs {
            if k != "marker" {
                q.params.push((k.clone(), v.clone()));
            }
            match k.as_str() {
                "limit" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| GlanceError::bad_request("limit param must be an integer"))?;
                    if n < 0 {
                        return Err(GlanceError::bad_request("limit param must be positive"));
                    }
                    q.limit = usize::try_from(n).unwrap_or(LIMIT_MAX).min(LIMIT_MAX);
                }
                "marker" => q.marker = Some(v),
                "sort_key" => sort_keys.push(SortKey::parse(&v)?),
                "sort_dir" => sort_dirs.push(direction(&v)?),
                "sort" => sort_new = Some(v),
                "visibility" => {
                    q.scope.visibility = Some(VisibilityFilter::parse(&v).ok_or_else(|| {
                        GlanceError::bad_request(format!("Invalid visibility value: {v}"))
                    })?)
                }
                "member_status" => {
                    q.scope.member_status = MemberStatusFilter::parse(&v)
                        .ok_or_else(|| GlanceError::bad_request(format!("Invalid status: {v}")))?
                }
                "changes-since" => {
                    return Err(GlanceError::bad_request(
                        "The \"changes-since\" filter is no longer available on v2.",
                    ));
                }
                "name" | "id" | "status" | "container_format" | "disk_format" => {
                    let col = match k.as_str() {
                        "name" => "name",
                        "id" => "id",
                        "status" => "status",
                        "container_format" => "container_format",
                        _ => "disk_format",
                    };
                    q.filters.push(Filter::Column(col, column_values(&v)?));
                }
                "owner" => q.filters.push(Filter::Column("owner", vec![v])),
                "checksum" => q.filters.push(Filter::Column("checksum", vec![v])),
                "os_hash_value" => q.filters.push(Filter::Column("os_hash_value", vec![v])),
                "tag" => q.filters.push(Filter::Tag(v)),
                "protected" => q
                    .filters
                    .push(Filter::Protected(bool_filter("protected", &v)?)),
                "os_hidden" => hidden = Some(bool_filter("os_hidden", &v)?),
                "size_min" => q.filters.push(Filter::SizeMin(size_filter(&v)?)),
                "size_max" => q.filters.push(Filter::SizeMax(size_filter(&v)?)),
                "created_at" => q.filters.push(time_filter("created_at", &v)?),
                "updated_at" => q.filters.push(time_filter("updated_at", &v)?),
                _ => q.filters.push(Filter::Property(k, v)),
            }
        }
        // Hidden images are listed only when asked for, and then only they.
        q.filters.push(Filter::OsHidden(hidden.unwrap_or(false)));
        q.sort = match sort_new {
            Some(_) if !sort_keys.is_empty() || !sort_dirs.is_empty() => {
                return Err(GlanceError::bad_request(
                    "Old and new sorting syntax cannot be combined",
                ));
            }
            Some(s) => s
                .split(',')
                .map(|item| {
                    let (key, dir) = match item.split_once(':') {
                        Some((k, d)) => (k.trim(), direction(d.trim())?),
                        None => (item.trim(), true),
                    };
                    Ok((SortKey::parse(key)?, dir))
                })
                .collect::<GlanceResult<_>>()?,
            None => {
                if sort_dirs.len() > 1 && sort_dirs.len() != sort_keys.len() {
                    return Err(GlanceError::bad_request(
                        "Number of sort dirs does not match the number of sort keys",
                    ));
                }
                if sort_keys.is_empty() {
                    sort_keys.push(SortKey::CreatedAt);
                }
                let default = sort_dirs.first().copied().unwrap_or(true);
                sort_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, sort_dirs.get(i).copied().unwrap_or(default)))
                    .collect()
            }
        };
        // Tie-breakers, as Glance appends them.
        for k in [SortKey::CreatedAt, SortKey::Id] {
            if !q.sort.iter().any(|(s, _)| *s == k) {
                q.sort.push((k, true));
            }
        }
        Ok(q)
    }

    fn keeps(&self, i: &Image) -> bool {
        self.filters.iter().all(|f| match f {
            Filter::Column(col, values) => {
                let v = match *col {
                    "name" => i.name.as_deref(),
                    "id" => Some(i.id.as_str()),
                    "status" => Some(i.status.as_str()),
                    "container_format" => i.container_format.as_deref(),
                    "disk_format" => i.disk_format.as_deref(),
                    "owner" => i.owner.as_deref(),
                    "checksum" => i.checksum.as_deref(),
                    _ => i.os_hash_value.as_deref(),
                };
                v.is_some_and(|v| values.iter().any(|x| x == v))
            }
            Filter::Property(k, v) => i.properties.get(k) == Some(v),
            Filter::Tag(t) => i.tags.contains(t),
            Filter::Protected(p) => i.protected == *p,
            Filter::OsHidden(h) => i.os_hidden == *h,
            Filter::SizeMin(n) => i.size.is_some_and(|s| s >= *n),
            Filter::SizeMax(n) => i.size.is_some_and(|s| s <= *n),
            Filter::Time(col, op, t) => {
                let v = if *col == "created_at" {
                    i.created_at
                } else {
                    i.updated_at
                };
                match op {
                    TimeOp::Gt => v > *t,
                    TimeOp::Gte => v >= *t,
                    TimeOp::Lt => v < *t,
                    TimeOp::Lte => v <= *t,
                    TimeOp::Eq => v == *t,
                    TimeOp::Neq => v != *t,
                }
            }
        })
    }

    fn order(&self, a: &Image, b: &Image) -> Ordering {
        for (key, desc) in &self.sort {
            let o = key.compare(a, b);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// Filters, sorts and cuts one page from `images`. A marker that is not among them is a
    /// 400 (as Glance answers an unknown one).
    pub fn page(&self, mut images: Vec<Image>) -> GlanceResult<Vec<Image>> {
        images.retain(|i| self.keeps(i));
        images.sort_by(|a, b| self.order(a, b));
        let start = match &self.marker {
            None => 0,
            Some(m) => {
                images.iter().position(|i| &i.id == m).ok_or_else(|| {
                    GlanceError::bad_request(format!("No image found with ID {m}"))
                })? + 1
            }
        };
        Ok(images.into_iter().skip(start).take(self.limit).collect())
    }

    /// `/v2/images` with the query's parameters (without marker).
    pub fn first_link(&self) -> String {
        if self.params.is_empty() {
            "/v2/images".into()
        } else {
            format!("/v2/images?{}", encode(&self.params))
        }
    }

    /// The next page after `last`, when this one was full.
    pub fn next_link(&self, page_len: usize, last: Option<&Image>) -> Option<String> {
        let last = last?;
        if page_len < self.limit {
            return None;
        }
        let mut params = self.params.clone();
        params.push(("marker".into(), last.id.clone()));
        Some(format!("/v2/images?{}", encode(&params)))
    }
}

fn direction(s: &str) -> GlanceResult<bool> {
    match s {
        "asc" => Ok(false),
        "desc" => Ok(true),
        _ => Err(GlanceError::bad_request(format!(
            "Invalid sort direction: {s}"
        ))),
    }
}

fn encode(params: &[(String, String)]) -> String {
    serde_urlencoded::to_string(params).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn image(id: &str, name: &str, size: u64, secs: i64) -> Image {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap();
        Image {
            id: id.into(),
            name: Some(name.into()),
            status: "active".into(),
            visibility: "shared".into(),
            protected: false,
            os_hidden: false,
            owner: Some("p".into()),
            disk_format: Some("qcow2".into()),
            container_format: Some("bare".into()),
            size: Some(size),
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            min_ram: 0,
            min_disk: 0,
            created_at: t,
            updated_at: t,
            tags: vec![],
            properties: BTreeMap::new(),
            direct_url: None,
        }
    }

    fn ids(v: &[Image]) -> Vec<&str> {
        v.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn newest_first_by_default_and_pages_follow_the_marker() {
        let all = vec![
            image("a", "x", 1, 1),
            image("b", "y", 2, 2),
            image("c", "z", 3, 3),
        ];
        let q = ListQuery::parse(Some("limit=2")).unwrap();
        let p = q.page(all.clone()).unwrap();
        assert_eq!(ids(&p), ["c", "b"]);
        let next = q.next_link(p.len(), p.last()).unwrap();
        assert_eq!(next, "/v2/images?limit=2&marker=b");
        let q = ListQuery::parse(next.split_once('?').map(|x| x.1)).unwrap();
        let p = q.page(all).unwrap();
        assert_eq!(ids(&p), ["a"]);
        assert_eq!(q.next_link(p.len(), p.last()), None);
        assert_eq!(q.first_link(), "/v2/images?limit=2");
    }

    #[test]
    fn sorting_old_and_new_syntax() {
        let all = vec![
            image("a", "m", 5, 1),
            image("b", "m", 1, 2),
            image("c", "a", 9, 3),
        ];
        let q = ListQuery::parse(Some(
            "sort_key=name&sort_key=size&sort_dir=asc&sort_dir=desc",
        ))
        .unwrap();
        assert_eq!(ids(&q.page(all.clone()).unwrap()), ["c", "a", "b"]);
        let q = ListQuery::parse(Some("sort=name:asc,size")).unwrap();
        assert_eq!(ids(&q.page(all).unwrap()), ["c", "a", "b"]);
        let e = ListQuery::parse(Some("sort=name&sort_key=size")).unwrap_err();
        assert_eq!(
            e.explanation,
            "Old and new sorting syntax cannot be combined"
        );
        let e = ListQuery::parse(Some("sort_key=foo")).unwrap_err();
        assert!(e.explanation.starts_with("Invalid sort key: foo."));
        let e = ListQuery::parse(Some("sort_dir=up")).unwrap_err();
        assert_eq!(e.explanation, "Invalid sort direction: up");
    }

    #[test]
    fn filters_and_their_errors() {
        let mut a = image("a", "one", 10, 1);
        a.tags = vec!["t1".into(), "t2".into()];
        a.properties.insert("os_distro".into(), "debian".into());
        let mut b = image("b", "two", 100, 2);
        b.os_hidden = true;
        let all = vec![a, b, image("c", "three", 1000, 3)];
        let page = |q: &str| {
            ids(&ListQuery::parse(Some(q))
                .unwrap()
                .page(all.clone())
                .unwrap())
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
        };
        assert_eq!(page("tag=t1&tag=t2"), ["a"]);
        assert_eq!(page("os_distro=debian"), ["a"]);
        assert_eq!(page("name=in:one,three"), ["c", "a"]);
        assert_eq!(page("size_min=50"), ["c"]);
        assert_eq!(page("os_hidden=true"), ["b"]);
        assert_eq!(page("created_at=gt:2023-11-14T22:13:21Z"), ["c"]);
        for (q, msg) in [
            ("limit=x", "limit param must be an integer"),
            ("limit=-1", "limit param must be positive"),
            ("visibility=x", "Invalid visibility value: x"),
            ("member_status=x", "Invalid status: x"),
            (
                "protected=maybe",
                "Invalid value 'maybe' for 'protected' filter. Valid values are 'true' or 'false'.",
            ),
            (
                "size_max=big",
                "Unable to filter on a range with a non-numeric value.",
            ),
            (
                "name=foo:bar",
                "Unable to filter by unknown operator 'foo'.",
            ),
            (
                "created_at=gte:soon",
                "Bad \"created_at\" query filter format. Use ISO 8601 DateTime notation.",
            ),
            (
                "changes-since=x",
                "The \"changes-since\" filter is no longer available on v2.",
            ),
        ] {
            assert_eq!(
                ListQuery::parse(Some(q)).unwrap_err().explanation,
                msg,
                "{q}"
            );
        }
        let e = ListQuery::parse(Some("marker=zzz"))
            .unwrap()
            .page(all)
            .unwrap_err();
        assert_eq!(e.explanation, "No image found with ID zzz");
        assert_eq!(
            ListQuery::parse(Some("limit=5000")).unwrap().limit,
            LIMIT_MAX
        );
    }
}
