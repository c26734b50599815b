// libFuzzer target: a ctnetlink dump as the kernel sends it back, through the code the backend reads it
// with. The input is a recording (NetlinkReplay: datagrams, each a 4-byte little-endian length and its
// bytes) fed to ConntrackDumpReader (framing, NLMSG_ERROR, NLMSG_DONE's result, ConntrackWire's entries);
// each entry then goes through the cleanup's matching (ConntrackSelector, ConntrackStaleness) against a
// plan, as `ConntrackTable.delete` and `deleteStale` do. Needs the libraries built with -enable-testing.
import KubeObjects
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import ServiceResolution

func makePlan(_ endpoint: String) -> RulePlan {
    var objects = ClusterObjects()
    let id = ObjectName(namespace: "default", name: "dns")
    objects.services.append(Service(
        id: id, type: "LoadBalancer", ports: [ServicePort(name: "dns", protocol: .udp, port: 53, targetPort: "5300")],
        loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.53")!), LoadBalancerIngress(ip: IPAddress("2001:db8:e::53")!)]))
    for (family, ip) in [("IPv4", endpoint), ("IPv6", "2001:db8:2::" + endpoint.split(separator: ".").last!)] {
        objects.endpointSlices.append(EndpointSlice(
            id: ObjectName(namespace: "default", name: "dns-\(family)"), serviceName: "dns", addressType: family,
            ports: [EndpointPort(name: "dns", port: 5300, protocol: .udp)], endpoints: [Endpoint(addresses: [IPAddress(ip)!])]))
    }
    let resolution = ServiceResolver(options: ResolutionOptions(target: .endpoints)).resolve(objects)
    return try! Planner(settings: PlanSettings()).plan(resolution, strategy: .endpoints)
}

let before = makePlan("198.51.100.5"), after = makePlan("198.51.100.6")
let selector = ConntrackSelector(ConntrackCleanup.deletions(from: before, to: after))
let staleness = ConntrackStaleness(plan: after)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzConntrack(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let datagrams = NetlinkReplay.datagrams(Array(UnsafeBufferPointer(start: data, count: size)))
    _ = NetlinkReplay.conntrackDump(datagrams) { entry in
        _ = selector.match(entry)
        _ = staleness.isStale(entry)
        _ = entry.description
    }
    return 0
}
