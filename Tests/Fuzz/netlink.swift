// libFuzzer target: what the kernel sends back over nftables netlink, through the code the backend reads it
// with. The input is a recording (NetlinkReplay: datagrams, each a 4-byte little-endian length and its
// bytes), fed in order, as a socket would deliver it, to
// - the read-back of `read(table:)`: NetlinkReplyCollector (framing, NLMSG_ERROR, multi-part dumps) and
//   TableDumpReader (libnftnl's parsing of the table, chains, sets, elements and rules), then
//   RulesetDecoder (the translation into InstalledRuleset) and its differences to a plan;
// - the ownership check's GETTABLE answer;
// - the acks of an nftables batch (BatchAnswers, NetlinkBatch.result: extended acks mapped to elements);
// - the change monitor's notification filter (NftChangeFilter).
// Needs the libraries built with -enable-testing (scripts/fuzz does).
import KubeObjects
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import ServiceResolution

/// dns with source ranges, api with ClientIP affinity, web plain; IPv4 and IPv6, TCP and UDP: every map,
/// set and chain kind the ruleset has.
let plan: RulePlan = {
    func ip(_ s: String) -> IPAddress { IPAddress(s)! }
    var objects = ClusterObjects()
    let specs: [(String, [String], TransportProtocol, Int, [String])] = [
        ("web", ["203.0.113.10", "2001:db8::10"], .tcp, 443, ["198.51.100.5", "198.51.100.6", "2001:db8::5"]),
        ("dns", ["203.0.113.11"], .udp, 53, ["198.51.100.7"]),
        ("api", ["203.0.113.12", "2001:db8::12"], .tcp, 8000, ["198.51.100.8", "198.51.100.9", "2001:db8::8"]),
    ]
    for (name, ips, proto, port, endpoints) in specs {
        let id = ObjectName(namespace: "default", name: name)
        objects.services.append(Service(
            id: id, type: "LoadBalancer", ports: [ServicePort(name: "p", protocol: proto, port: port, targetPort: "9000")],
            loadBalancerIngress: ips.map { LoadBalancerIngress(ip: ip($0)) },
            sessionAffinity: name == "api" ? "ClientIP" : nil, sessionAffinityTimeoutSeconds: name == "api" ? 60 : nil,
            loadBalancerSourceRanges: name == "dns" ? ["203.0.113.0/25"] : []))
        for family in ["IPv4", "IPv6"] {
            let eps = endpoints.filter { $0.contains(":") == (family == "IPv6") }
            guard !eps.isEmpty else { continue }
            objects.endpointSlices.append(EndpointSlice(
                id: ObjectName(namespace: "default", name: "\(name)-\(family)"), serviceName: name, addressType: family,
                ports: [EndpointPort(name: "p", port: 9000, protocol: proto)], endpoints: eps.map { Endpoint(addresses: [ip($0)]) }))
        }
    }
    let resolution = ServiceResolver(options: ResolutionOptions(target: .endpoints)).resolve(objects)
    return try! Planner(settings: PlanSettings()).plan(resolution, strategy: .endpoints)
}()
let expected = NftablesNetlink.expected(plan)
let batch = NetlinkBatch(try! RulesetProgram.operations(plan))

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNetlink(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let datagrams = NetlinkReplay.datagrams(Array(UnsafeBufferPointer(start: data, count: size)))
    guard !datagrams.isEmpty else { return 0 }

    do {
        if let dumped = try NetlinkReplay.readTable(datagrams, family: .inet, name: plan.settings.table) {
            let installed = RulesetDecoder.decode(dumped)
            _ = installed.differences(to: expected).count
            _ = installed.mappings.map(\.description)
        }
    } catch {
        _ = error.description
    }

    var feed = NetlinkReplay.Feed(datagrams)
    if let reply = try? feed.reply(dump: false) {
        do { _ = try NftablesNetlink.ownership(reply, name: plan.settings.table, verb: "replace") } catch { _ = error.description }
    }

    do {
        _ = try NetlinkReplay.commit(batch, beginSequence: NetlinkReplay.Feed(datagrams).sequence &- 1, datagrams)
    } catch {
        _ = error.description
    }

    var filter = NftChangeFilter(table: plan.settings.table, isOwnPort: { $0 == 1 })
    for d in datagrams { _ = filter.consume(datagram: d) }
    return 0
}
