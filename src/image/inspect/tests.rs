use super::*;

fn run(data: &[u8]) -> Result<Inspection, InspectError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(inspect(data))
}

fn put(buf: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if buf.len() < at + bytes.len() {
        buf.resize(at + bytes.len(), 0);
    }
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn qcow2(version: u32, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    put(&mut b, 0, b"QFI\xfb");
    put(&mut b, 4, &version.to_be_bytes());
    put(&mut b, 20, &16u32.to_be_bytes());
    put(&mut b, 24, &size.to_be_bytes());
    b
}

#[test]
fn a_plain_qcow2_is_safe_with_its_virtual_size() {
    let i = run(&qcow2(3, 10 << 30)).unwrap();
    assert_eq!(i.format, Format::Qcow2);
    assert_eq!(i.virtual_size, Some(10 << 30));
    assert!(i.violations.is_empty());
    check_claim("qcow2", &i).unwrap();
    assert!(
        check_claim("vmdk", &i)
            .unwrap_err()
            .contains("(qcow2) not (vmdk)")
    );
}

#[test]
fn qcow2_backing_files_data_files_and_unknown_features_are_refused() {
    let mut b = qcow2(3, 1 << 20);
    put(&mut b, 8, &512u64.to_be_bytes());
    let i = run(&b).unwrap();
    assert_eq!(i.violations[0].check, "backing_file");

    let mut b = qcow2(3, 1 << 20);
    b[0x4F] = 0x04;
    let i = run(&b).unwrap();
    assert_eq!(i.violations[0].check, "data_file");
    assert!(check_claim("qcow2", &i).unwrap_err().contains("data_file"));

    // Extended L2 entries (bit 4) and any higher bit: unknown.
    let mut b = qcow2(3, 1 << 20);
    b[0x4F] = 0x10;
    assert_eq!(run(&b).unwrap().violations[0].check, "unknown_features");
    let mut b = qcow2(3, 1 << 20);
    b[0x48] = 0x01;
    assert_eq!(run(&b).unwrap().violations[0].check, "unknown_features");
    // The dirty, corrupt and compression-type bits are known.
    let mut b = qcow2(3, 1 << 20);
    b[0x4F] = 0x0B;
    assert!(run(&b).unwrap().violations.is_empty());
    assert_eq!(
        run(&qcow2(4, 1)).unwrap().violations[0].message,
        "Unsupported qcow2 version"
    );
    assert!(run(&qcow2(2, 1)).unwrap().violations.is_empty());
}

#[test]
fn a_qcow2_shorter_than_a_sector_is_raw_and_a_raw_claim_still_checks_safety() {
    let b = qcow2(3, 1);
    let i = run(&b[..300]).unwrap();
    assert_eq!(i.format, Format::Raw);
    let mut b = qcow2(3, 1);
    put(&mut b, 8, &512u64.to_be_bytes());
    let i = run(&b).unwrap();
    assert!(check_claim("raw", &i).unwrap_err().contains("backing"));
    check_claim("raw", &run(&qcow2(3, 1)).unwrap()).unwrap();
}

fn vmdk(create_type: &str, extra: &str, gd_at_end: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    put(&mut b, 0, b"KDMV");
    put(&mut b, 4, &1u32.to_le_bytes());
    put(&mut b, 12, &2048u64.to_le_bytes()); // capacity in sectors
    put(&mut b, 20, &128u64.to_le_bytes());
    put(&mut b, 28, &1u64.to_le_bytes()); // descriptor at sector 1
    put(&mut b, 36, &2u64.to_le_bytes()); // two sectors
    if gd_at_end {
        put(&mut b, 56, &u64::MAX.to_le_bytes());
    }
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n{extra}\n# The Disk Data Base\nddb.virtualHWVersion = \"4\"\n"
    );
    put(&mut b, 512, desc.as_bytes());
    b
}

#[test]
fn vmdk_sparse_and_stream_optimized_pass_with_their_capacity() {
    let i = run(&vmdk(
        "monolithicSparse",
        "RW 2048 SPARSE \"disk.vmdk\"",
        false,
    ))
    .unwrap();
    assert_eq!(i.format, Format::Vmdk);
    assert_eq!(i.virtual_size, Some(2048 * 512));
    assert!(i.violations.is_empty(), "{:?}", i.violations);
}

#[test]
fn vmdk_descriptors_naming_paths_parents_or_other_subformats_are_refused() {
    let i = run(&vmdk(
        "monolithicSparse",
        "RW 2048 SPARSE \"/etc/passwd\"",
        false,
    ))
    .unwrap();
    assert_eq!(i.violations[0].message, "Invalid extent filenames found");
    let i = run(&vmdk(
        "monolithicFlat",
        "RW 2048 FLAT \"disk-flat.vmdk\" 0",
        false,
    ))
    .unwrap();
    assert_eq!(i.violations[0].message, "Unsupported subformat");
    assert_eq!(i.virtual_size, None);
    let i = run(&vmdk(
        "monolithicSparse",
        "parentFileNameHint=\"host.vmdk\"\nRW 2048 SPARSE \"disk.vmdk\"",
        false,
    ))
    .unwrap();
    assert!(i.violations[0].message.contains("parent"));
    let i = run(&vmdk("monolithicSparse", "", false)).unwrap();
    assert_eq!(i.violations[0].message, "No extents found");
    let i = run(&vmdk(
        "monolithicSparse",
        "RW 2048 SPARSE \"d.vmdk\"\nrm -rf x y",
        false,
    ))
    .unwrap();
    assert_eq!(i.violations[0].message, "Invalid VMDK descriptor data");
    // A bare descriptor names its extents elsewhere.
    let text = b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"x\" 0\n";
    let i = run(text).unwrap();
    assert_eq!(i.format, Format::Vmdk);
    assert!(!i.violations.is_empty());
}

#[test]
fn a_stream_optimized_footer_must_agree_with_the_header() {
    let mut b = vmdk("streamOptimized", "RW 2048 SPARSE \"d.vmdk\"", true);
    // Footer marker, footer header (the real one), end-of-stream marker.
    let mut marker = vec![0u8; 512];
    put(&mut marker, 12, &3u32.to_le_bytes());
    let mut footer = b[..512].to_vec();
    put(&mut footer, 56, &4096u64.to_le_bytes());
    b.extend_from_slice(&marker);
    b.extend_from_slice(&footer);
    b.extend_from_slice(&[0u8; 512]);
    let i = run(&b).unwrap();
    assert!(i.violations.is_empty(), "{:?}", i.violations);

    let n = b.len();
    let mut bad = b.clone();
    put(&mut bad, n - 1024 + 4, &2u32.to_le_bytes());
    assert_eq!(
        run(&bad).unwrap().violations[0].message,
        "Header and footer versions do not match"
    );
    let mut bad = b.clone();
    put(&mut bad, n - 1024 + 56, &u64::MAX.to_le_bytes());
    assert_eq!(
        run(&bad).unwrap().violations[0].message,
        "Footer indicates another footer"
    );
    let mut bad = b;
    bad[n - 100] = 1;
    assert_eq!(
        run(&bad).unwrap().violations[0].message,
        "End-of-stream marker is invalid"
    );
}

#[test]
fn vdi_vhd_vhdx_iso_and_luks_report_their_sizes() {
    let mut b = vec![0u8; 4096];
    put(&mut b, 0x40, &0xBEDA_107Fu32.to_le_bytes());
    put(&mut b, 0x170, &(5u64 << 30).to_le_bytes());
    let i = run(&b).unwrap();
    assert_eq!((i.format, i.virtual_size), (Format::Vdi, Some(5 << 30)));

    let mut b = vec![0u8; 4096];
    put(&mut b, 0, b"conectix");
    put(&mut b, 40, &(3u64 << 30).to_be_bytes());
    let i = run(&b).unwrap();
    assert_eq!((i.format, i.virtual_size), (Format::Vhd, Some(3 << 30)));
    assert_eq!(i.format.qemu_driver(), "vpc");

    let mut b = vec![0u8; 0x100000 + 4096];
    put(&mut b, 0, b"vhdxfile");
    put(&mut b, 0x30000, &0x6967_6572u32.to_le_bytes());
    put(&mut b, 0x30008, &1u32.to_le_bytes());
    put(&mut b, 0x30010, &VHDX_METADATA_GUID);
    put(&mut b, 0x30020, &0x100000u64.to_le_bytes());
    put(&mut b, 0x100000, b"metadata");
    put(&mut b, 0x10000A, &1u16.to_le_bytes());
    put(&mut b, 0x100020, &VHDX_VIRTUAL_DISK_SIZE_GUID);
    put(&mut b, 0x100030, &512u32.to_le_bytes());
    put(&mut b, 0x100034, &8u32.to_le_bytes());
    put(&mut b, 0x100200, &(7u64 << 30).to_le_bytes());
    let i = run(&b).unwrap();
    assert_eq!((i.format, i.virtual_size), (Format::Vhdx, Some(7 << 30)));

    let mut b = vec![0u8; 40000];
    b[32768] = 1;
    put(&mut b, 32769, b"CD001");
    put(&mut b, 32768 + 80, &100u32.to_le_bytes());
    put(&mut b, 32768 + 128, &2048u16.to_le_bytes());
    let i = run(&b).unwrap();
    assert_eq!((i.format, i.virtual_size), (Format::Iso, Some(100 * 2048)));

    let mut b = vec![0u8; 8192];
    put(&mut b, 0, b"LUKS\xba\xbe");
    put(&mut b, 6, &2u16.to_be_bytes());
    let i = run(&b).unwrap();
    assert_eq!(i.format, Format::Luks);
    assert_eq!(i.violations[0].message, "LUKS version 2 is not supported");
}

#[test]
fn an_iso_hiding_a_qcow2_header_is_refused_and_a_hybrid_iso_is_an_iso() {
    let mut b = qcow2(3, 1 << 20);
    b.resize(40000, 0);
    put(&mut b, 32769, b"CD001");
    assert!(matches!(run(&b), Err(InspectError::Multiple(_))));

    let mut b = vec![0u8; 40000];
    put(&mut b, 32769, b"CD001");
    put(&mut b, 510, &0xAA55u16.to_le_bytes());
    b[446 + 4] = 0x83;
    assert_eq!(run(&b).unwrap().format, Format::Iso);
}

#[test]
fn partition_tables_are_raw_disks_with_checked_entries() {
    let mut b = vec![0u8; 4096];
    put(&mut b, 510, &0xAA55u16.to_le_bytes());
    b[446 + 4] = 0xEE;
    put(&mut b, 446 + 1, &[0, 2, 0]);
    put(&mut b, 446 + 8, &1u32.to_le_bytes());
    let i = run(&b).unwrap();
    assert_eq!(i.format, Format::Gpt);
    assert!(i.violations.is_empty());
    check_claim("raw", &i).unwrap();
    b[446 + 16 + 4] = 0x83;
    let i = run(&b).unwrap();
    assert_eq!(
        i.violations[0].message,
        "GPT MBR defines invalid extra partitions"
    );
    // Table details do not stop a raw disk (as Glance's gpt_safety_checks_nonfatal).
    check_claim("raw", &i).unwrap();
}

#[test]
fn qed_is_banned_and_unknown_bytes_are_raw() {
    let mut b = vec![0u8; 4096];
    put(&mut b, 0, b"QED\0");
    let i = run(&b).unwrap();
    assert!(check_claim("qed", &i).unwrap_err().contains("not allowed"));
    let i = run(&[7u8; 10000]).unwrap();
    assert_eq!((i.format, i.virtual_size), (Format::Raw, None));
    check_claim("raw", &i).unwrap();
    check_claim("ami", &i).unwrap();
    assert!(check_claim("qcow2", &i).is_err());
    assert_eq!(run(&[][..]).unwrap().format, Format::Raw);
}
