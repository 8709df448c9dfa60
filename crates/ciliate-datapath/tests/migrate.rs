//! Pinned maps across builds (`ciliate_datapath::migrate`): a node whose
//! maps an "older build" pinned with another capacity or layout loads this
//! build's objects and keeps its entries. The older maps are made here with
//! the definitions such a build would have had (and the Maglev map's
//! layout before chunks, through its converter). Needs root (bpffs, maps);
//! CI runs as root.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use ciliate_common::{
    ct::{self, CtEntry, CtKey4},
    lb,
};
use ciliate_datapath::{
    loader,
    migrate::{self, MapDef},
    objects,
    testrun::ScratchNode,
};

/// Replace the map pinned as `name` under `dir` by a new one with `def`,
/// holding what `fill` puts in it.
fn pin_older(dir: &std::path::Path, name: &str, def: MapDef, fill: impl FnOnce(MapData)) {
    let path = dir.join(name);
    std::fs::remove_file(&path).unwrap();
    let obj = aya_obj::Map::new_from_params(
        def.map_type,
        def.key_size,
        def.value_size,
        def.max_entries,
        def.flags,
    );
    let data = MapData::create(obj, name, None).unwrap();
    data.pin(&path).unwrap();
    fill(MapData::from_pin(&path).unwrap());
}

fn ct_key(i: u32) -> CtKey4 {
    CtKey4 {
        saddr: [10, 200, 0, 5],
        daddr: Ipv4Addr::from(0xc612_0000 | i).octets(),
        sport: 40000u16.to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        dir: ct::DIR_EGRESS,
        _pad: [0; 2],
    }
}

#[test]
fn maps_an_older_build_pinned_differently_are_made_anew_with_their_entries() {
    let node = ScratchNode::new("migrate").expect("scratch pin dir (needs root)");
    let dir = node.pins.dir.clone();
    loader::load_lxc(&node.pins).unwrap();
    loader::load_sock(&node.pins).unwrap();
    let cfg = ciliate_common::config::HostConfig { ifindex: 3, ..Default::default() };
    loader::load_host(&node.pins, &cfg).unwrap();
    // The same build again: nothing differs, nothing is set aside.
    for object in ["lxc", "sock", "host"] {
        let bytes = objects::by_name(object).unwrap().bytes;
        let none = Default::default();
        assert_eq!(
            migrate::set_aside(bytes, &dir, &none).unwrap(),
            Vec::<String>::new(),
            "{object}"
        );
    }
    let _ = migrate::take_report();

    // An older build with a conntrack table of 1,024 entries holding 100
    // connections: this build's 524,288-entry table takes them all.
    let tcp = migrate::pinned(&dir.join(ct::TCP_MAP_NAME)).unwrap();
    pin_older(&dir, ct::TCP_MAP_NAME, MapDef { max_entries: 1024, ..tcp }, |d| {
        let mut m: HashMap<MapData, CtKey4, CtEntry> =
            HashMap::try_from(Map::LruHashMap(d)).unwrap();
        for i in 0..100 {
            m.insert(ct_key(i), CtEntry { tx_packets: u64::from(i), ..Default::default() }, 0)
                .unwrap();
        }
    });
    // One whose backends table held 10 more entries than this build's:
    // they are counted as lost, the rest copied.
    let backends = migrate::pinned(&dir.join(lb::BACKENDS_MAP)).unwrap();
    let bigger = lb::MAX_BACKENDS + 10;
    pin_older(&dir, lb::BACKENDS_MAP, MapDef { max_entries: bigger, ..backends }, |d| {
        let mut m: HashMap<MapData, u32, lb::LbBackend> =
            HashMap::try_from(Map::HashMap(d)).unwrap();
        for i in 0..bigger {
            m.insert(i, lb::LbBackend { addr: [10, 0, 0, 1], ..Default::default() }, 0).unwrap();
        }
    });
    // One whose affinity entries were 8 bytes longer (a layout change with
    // no converter): the new map starts empty, the old one is kept.
    let aff = migrate::pinned(&dir.join("ciliate_lb4_affinity")).unwrap();
    let older_aff = MapDef { value_size: aff.value_size + 8, ..aff };
    pin_older(&dir, "ciliate_lb4_affinity", older_aff, |_| {});

    // One from before Maglev tables came in chunks (reverse-NAT index →
    // the whole table of 16381 entries), with two tables: the converter
    // cuts each into the chunks this build reads.
    let maglev = migrate::pinned(&dir.join(lb::MAGLEV_MAP)).unwrap();
    let whole = |i: u16| -> Vec<u32> { (0..16381u32).map(|s| s % 7 + u32::from(i)).collect() };
    let older_maglev = MapDef { key_size: 2, value_size: 16381 * 4, max_entries: 4096, ..maglev };
    pin_older(&dir, lb::MAGLEV_MAP, older_maglev, |d| {
        let mut m: HashMap<MapData, u16, [u32; 16381]> =
            HashMap::try_from(Map::HashMap(d)).unwrap();
        for i in [3u16, 9] {
            m.insert(i, <[u32; 16381]>::try_from(whole(i)).unwrap(), 0).unwrap();
        }
    });

    loader::load_lxc(&node.pins).unwrap();
    loader::load_sock(&node.pins).unwrap();

    let lbm = ciliate_datapath::lbmaps::LbMaps::from_pin_dir(&dir).unwrap();
    assert_eq!(lbm.maglev_indexes().unwrap(), [3, 9]);
    for i in [3u16, 9] {
        assert_eq!(lbm.maglev(i).unwrap().unwrap(), whole(i), "table {i} converted");
    }
    assert_eq!(migrate::pinned(&dir.join(ct::TCP_MAP_NAME)).unwrap(), tcp, "this build's table");
    let ct = ciliate_datapath::maps::CtMaps::from_pin_dir(&dir).unwrap();
    for i in 0..100 {
        let e = ct.get(&ct_key(i)).unwrap().expect("every connection carried over");
        assert_eq!(e.tx_packets, u64::from(i));
    }
    assert!(!dir.join("old").exists(), "the old pins go");
    assert_eq!(migrate::pinned(&dir.join("ciliate_lb4_affinity")).unwrap(), aff);
    assert!(dir.join("unmigrated/ciliate_lb4_affinity").exists(), "kept, not dropped");

    let mut report = migrate::take_report();
    report.sort_by(|a, b| a.map.cmp(&b.map));
    let got: Vec<(&str, usize, usize)> =
        report.iter().map(|m| (m.map.as_str(), m.copied, m.lost)).collect();
    assert_eq!(
        got,
        [
            (ct::TCP_MAP_NAME, 100, 0),
            ("ciliate_lb4_affinity", 0, 0),
            (lb::BACKENDS_MAP, lb::MAX_BACKENDS as usize, 10),
            (lb::MAGLEV_MAP, 8, 0),
        ],
        "{report:#?}"
    );
    assert!(report[1].outcome.contains("layout changed"), "{}", report[1].outcome);
    assert!(report[3].outcome.starts_with("converted 8"), "{}", report[3].outcome);
    // And loading once more changes nothing.
    loader::load_lxc(&node.pins).unwrap();
    assert!(migrate::take_report().is_empty());

    // A capacity set at load time (the agent's --bpf-nat-global-max): the
    // NAT table is made with it, its entries carried over.
    {
        let mut nat: HashMap<MapData, CtKey4, ciliate_common::nat::NatEntry> = HashMap::try_from(
            Map::LruHashMap(MapData::from_pin(dir.join(ciliate_common::nat::MAP_NAME)).unwrap()),
        )
        .unwrap();
        for i in 0..10 {
            nat.insert(ct_key(i), ciliate_common::nat::NatEntry::default(), 0).unwrap();
        }
    }
    let mut pins = node.pins.clone();
    pins.capacities.insert(ciliate_common::nat::MAP_NAME.into(), 4096);
    loader::load_lxc(&pins).unwrap();
    let nat = migrate::pinned(&dir.join(ciliate_common::nat::MAP_NAME)).unwrap();
    assert_eq!(nat.max_entries, 4096);
    let report = migrate::take_report();
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!((report[0].copied, report[0].lost), (10, 0));
    // The node's programs are loaded anew for other capacities.
    let a = loader::node_object(&node.pins, "sock", None::<(&str, &u8)>).unwrap();
    let b = loader::node_object(&pins, "sock", None::<(&str, &u8)>).unwrap();
    assert_ne!(a.dir, b.dir, "the same programs for other capacities");
}
