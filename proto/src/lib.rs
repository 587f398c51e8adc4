//! gRPC definitions (tonic/prost) shared by control, dataplane and meshctl.
//! Empty until the control plane lands; no service is defined yet.
