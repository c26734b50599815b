import KubeObjects
import NetAddress
import Testing

@Suite struct ObjectStoreTests {
    let web = ObjectName(namespace: "shop", name: "web")

    func slice(_ name: String, service: String?, _ addresses: [String]) -> EndpointSlice {
        EndpointSlice(id: ObjectName(namespace: "shop", name: name), serviceName: service, addressType: "IPv4",
                      ports: [EndpointPort(port: 80)], endpoints: addresses.map { Endpoint(addresses: [IPAddress($0)!]) })
    }

    @Test func changesReportTheServicesToReResolve() {
        var store = ObjectStore()
        // A slice before its Service: indexed, and the (absent) service is reported.
        #expect(store.apply(.endpointSlice(slice("web-1", service: "web", ["198.51.100.1"]))) == [web])
        #expect(store.slices(of: web).count == 1)
        let svc = Service(id: web, ports: [ServicePort(port: 80)])
        #expect(store.apply(.service(svc)) == [web])
        #expect(store.apply(.service(svc)).isEmpty, "an identical copy changes nothing")
        // A slice moving to another service affects both.
        #expect(store.apply(.endpointSlice(slice("web-1", service: "api", ["198.51.100.1"]))) == [web, ObjectName(namespace: "shop", name: "api")])
        #expect(store.slices(of: web).isEmpty)
        #expect(store.apply(.endpointSliceDeleted(ObjectName(namespace: "shop", name: "web-1"))) == [ObjectName(namespace: "shop", name: "api")])
        #expect(store.apply(.endpointSliceDeleted(ObjectName(namespace: "shop", name: "web-1"))).isEmpty)
        #expect(store.apply(.serviceDeleted(web)) == [web])
    }

    @Test func aRelistReportsExactlyWhatDiffers() {
        var store = ObjectStore()
        _ = store.replaceServices([Service(id: web), Service(id: ObjectName(namespace: "shop", name: "gone"))])
        _ = store.replaceEndpointSlices([slice("web-1", service: "web", ["198.51.100.1"]), slice("x", service: "other", [])])
        #expect(store.replaceServices([Service(id: web)]) == [ObjectName(namespace: "shop", name: "gone")])
        #expect(store.replaceEndpointSlices([slice("web-1", service: "web", ["198.51.100.2"])])
                == [web, ObjectName(namespace: "shop", name: "other")])
        #expect(store.slices(of: web).map(\.endpoints.count) == [1])
    }
}
