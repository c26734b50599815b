/// One change to the objects a source knows, as a watch reports it.
public enum ObjectChange: Sendable, Equatable {
    case service(Service)
    case serviceDeleted(ObjectName)
    case endpointSlice(EndpointSlice)
    case endpointSliceDeleted(ObjectName)
}

/// Services and EndpointSlices keyed by `namespace/name`, with an index from each Service to its slices
/// (by the `kubernetes.io/service-name` label). Every mutation returns the Services whose resolution may
/// have changed, so an agent re-resolves only those.
public struct ObjectStore: Sendable {
    public private(set) var services: [ObjectName: Service] = [:]
    public private(set) var endpointSlices: [ObjectName: EndpointSlice] = [:]
    /// Service → names of the slices that say they belong to it. A slice can arrive before its Service.
    private var slicesByService: [ObjectName: Set<ObjectName>] = [:]

    public init() {}

    public init(_ objects: ClusterObjects) {
        for s in objects.services where services[s.id] == nil { services[s.id] = s }
        for e in objects.endpointSlices { _ = put(e) }
    }

    /// The service a slice belongs to, if it names one.
    static func owner(_ slice: EndpointSlice) -> ObjectName? {
        slice.serviceName.map { ObjectName(namespace: slice.id.namespace, name: $0) }
    }

    public func slices(of service: ObjectName) -> [EndpointSlice] {
        guard let names = slicesByService[service] else { return [] }
        return names.sorted().compactMap { endpointSlices[$0] }
    }

    /// Applies one change; returns the services to re-resolve (empty when nothing changed).
    public mutating func apply(_ change: ObjectChange) -> Set<ObjectName> {
        switch change {
        case .service(let s):
            if services[s.id] == s { return [] }
            services[s.id] = s
            return [s.id]
        case .serviceDeleted(let name):
            return services.removeValue(forKey: name) == nil ? [] : [name]
        case .endpointSlice(let e):
            return put(e)
        case .endpointSliceDeleted(let name):
            guard let old = endpointSlices.removeValue(forKey: name) else { return [] }
            guard let owner = Self.owner(old) else { return [] }
            slicesByService[owner]?.remove(name)
            if slicesByService[owner]?.isEmpty == true { slicesByService[owner] = nil }
            return [owner]
        }
    }

    private mutating func put(_ e: EndpointSlice) -> Set<ObjectName> {
        let old = endpointSlices[e.id]
        if old == e { return [] }
        endpointSlices[e.id] = e
        var affected = Set<ObjectName>()
        if let old, let before = Self.owner(old) {
            slicesByService[before]?.remove(e.id)
            if slicesByService[before]?.isEmpty == true { slicesByService[before] = nil }
            affected.insert(before)
        }
        if let owner = Self.owner(e) {
            slicesByService[owner, default: []].insert(e.id)
            affected.insert(owner)
        }
        return affected
    }

    /// Replaces all Services (a list or relist); returns the services that appeared, changed or went away.
    public mutating func replaceServices(_ list: [Service]) -> Set<ObjectName> {
        var fresh: [ObjectName: Service] = [:]
        for s in list where fresh[s.id] == nil { fresh[s.id] = s }
        var affected = Set<ObjectName>()
        for (name, s) in fresh where services[name] != s { affected.insert(name) }
        for name in services.keys where fresh[name] == nil { affected.insert(name) }
        services = fresh
        return affected
    }

    /// Replaces all EndpointSlices (a list or relist); returns the services whose slices changed.
    public mutating func replaceEndpointSlices(_ list: [EndpointSlice]) -> Set<ObjectName> {
        var fresh: [ObjectName: EndpointSlice] = [:]
        for e in list { fresh[e.id] = e }
        var affected = Set<ObjectName>()
        for (name, e) in fresh where endpointSlices[name] != e { if let o = Self.owner(e) { affected.insert(o) } }
        for (name, old) in endpointSlices where fresh[name] != old { if let o = Self.owner(old) { affected.insert(o) } }
        endpointSlices = [:]
        slicesByService = [:]
        for e in fresh.values { _ = put(e) }
        return affected
    }

    /// Everything, as one-shot commands and `render` see it.
    public var objects: ClusterObjects {
        var o = ClusterObjects()
        o.services = services.values.sorted { $0.id < $1.id }
        o.endpointSlices = endpointSlices.values.sorted { $0.id < $1.id }
        return o
    }
}
